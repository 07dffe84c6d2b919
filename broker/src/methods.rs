//! Full gRPC method paths: what a signed request's signature covers.
pub const REGISTER_ACTOR: &str = "/broker.v1.Registry/RegisterActor";
pub const LIST_ACTORS: &str = "/broker.v1.Registry/ListActors";
pub const WHOAMI: &str = "/broker.v1.Registry/Whoami";
pub const LIST_PROXIES: &str = "/broker.v1.Registry/ListProxies";
pub const ENROLL: &str = "/broker.v1.Records/Enroll";
pub const UPLOAD: &str = "/broker.v1.Records/Upload";
pub const PROPOSE: &str = "/broker.v1.Studies/Propose";
pub const DECIDE: &str = "/broker.v1.Studies/Decide";
pub const LIST_STUDIES: &str = "/broker.v1.Studies/List";
pub const GET_STUDY: &str = "/broker.v1.Studies/Get";
pub const ISSUE_GRANTS: &str = "/broker.v1.Grants/Issue";
pub const REQUEST_RELEASE: &str = "/broker.v1.Releases/Request";
pub const FETCH_RELEASE: &str = "/broker.v1.Releases/Fetch";
