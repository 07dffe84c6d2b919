//! The broker's domain service: every operation, authorized by role, on domain types.
//! The gRPC adapter in [`crate::grpc`] converts messages and calls these.

mod audit;
mod cfrag_check;
mod cohort;
mod consents;
mod emergency;
mod erasure;
mod feasibility;
mod grants;
mod records;
mod release;
mod studies;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use model::{Actor, Caller, Role};
pub use pre_kms::request_auth::now_secs;
use pre_kms::request_auth::{AuthError, Credentials, ReplayGuard, SignedCall};

pub use audit::{AccessLog, EVENTS_PAGE, content_hash};
pub use cohort::IndexLoad;
pub use emergency::{BreakGlassAnswer, BreakGlassPolicy};
pub use feasibility::{CountAnswer, Feasibility};
pub use grants::GrantOutcome;
pub use release::{ReleaseStream, ReleasedItem};

use crate::error::{ServiceError, ServiceResult};
use crate::proxy_pool::ProxyPool;
use crate::storage::{BlobStore, Db, IndexSnapshots};

/// What the operator sets: the proxies' threshold, the sponsors' counting allowance and
/// the break-glass window and limits.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub threshold: usize,
    pub count_budget: cohort_query::BudgetPolicy,
    pub break_glass: BreakGlassPolicy,
}

pub struct Broker {
    db: Mutex<Db>,
    blobs: BlobStore,
    proxies: ProxyPool,
    threshold: usize,
    guard: ReplayGuard,
    refusals: audit::UnauthenticatedRefusals,
    actors: RwLock<HashMap<String, Actor>>,
    subject_secret: [u8; 32],
    audit: AccessLog,
    feasibility: Feasibility,
    cohorts: cohort::Cohorts,
    break_glass: BreakGlassPolicy,
    /// Proxies caught answering a fragment that does not verify ([`cfrag_check`]).
    suspects: cfrag_check::Suspects,
    /// Held while an erasure job runs: jobs run one at a time.
    erasing: tokio::sync::Mutex<()>,
}

impl Broker {
    pub fn new(
        db: Db,
        blobs: BlobStore,
        proxies: ProxyPool,
        audit: AccessLog,
        settings: Settings,
        index_snapshots: Option<IndexSnapshots>,
    ) -> ServiceResult<Arc<Broker>> {
        let Settings {
            threshold,
            count_budget,
            break_glass,
        } = settings;
        let actors = db
            .actors()?
            .into_iter()
            .map(|a| (a.actor_id.clone(), a))
            .collect();
        let subject_secret = db.secret("subject-pseudonym-key")?;
        let feasibility = Feasibility::new(db.secret("count-noise-key")?, count_budget);
        let broker = Arc::new(Broker {
            db: Mutex::new(db),
            blobs,
            proxies,
            threshold,
            guard: ReplayGuard::default(),
            refusals: Default::default(),
            actors: RwLock::new(actors),
            subject_secret,
            audit,
            feasibility,
            cohorts: cohort::Cohorts::new(index_snapshots),
            break_glass,
            suspects: Default::default(),
            erasing: tokio::sync::Mutex::new(()),
        });
        broker.reindex_log()?;
        broker.recover_intents()?;
        Ok(broker)
    }

    fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn proxies(&self) -> &ProxyPool {
        &self.proxies
    }

    /// Authenticates a signed call and checks the caller's role against the access
    /// table ([`crate::access`]). Registered actors call in their role; an enrolled
    /// patient's own key calls as a patient. Every refusal reaches the access log: a
    /// role refusal at once, in the authenticated caller's name; a call that did not
    /// authenticate only counted, and written with the others at the next flush.
    pub fn authorize(&self, call: &SignedCall, method: &str) -> ServiceResult<Caller> {
        let caller = match self.authenticate(call, method) {
            Ok(caller) => caller,
            Err(e) => {
                self.refusals.count(method, &e.to_string());
                return Err(e);
            }
        };
        let roles = crate::access::allowed(method);
        if !roles.contains(&caller.role) {
            let allowed = roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(" or ");
            let e = ServiceError::PermissionDenied(format!(
                "the {} role may not call {method}; it needs {allowed}",
                caller.role
            ));
            self.record_refusal(&caller, method, &e.to_string());
            return Err(e);
        }
        Ok(caller)
    }

    /// What can be checked of a call's credentials before its body is decoded (see
    /// [`ReplayGuard::precheck`]); a refusal is counted like any unauthenticated one.
    pub fn precheck(&self, credentials: &Result<Credentials, AuthError>) -> ServiceResult<()> {
        let result = credentials.as_ref().map_err(Clone::clone).and_then(|c| {
            self.guard.precheck(c, |id| {
                self.actor(id).is_some() || {
                    let db = self.db();
                    db.patient_by_actor(id).ok().flatten().is_some()
                        || db.erased_actor(id).ok().flatten().is_some()
                }
            })
        });
        result.map_err(|e| {
            self.refusals
                .count("(before the body was read)", &e.to_string());
            ServiceError::Unauthenticated(e)
        })
    }

    /// Who signed the call: a registered actor, or an enrolled patient's own key.
    fn authenticate(&self, call: &SignedCall, method: &str) -> ServiceResult<Caller> {
        let mut patient = false;
        let actor_id = self.guard.verify(call, method, |id| {
            let key = {
                let actors = self.actors.read().unwrap_or_else(|e| e.into_inner());
                actors.get(id).map(|a| a.verifying_key.clone())
            };
            let key = key.or_else(|| {
                let row = self.db().patient_by_actor(id).ok().flatten();
                patient = row.is_some();
                row.map(|(_, vk)| vk)
            });
            // A patient erased since still fetches their receipts with their key.
            let key = key.or_else(|| {
                let erased = (method == broker_proto::methods::ERASE)
                    .then(|| self.db().erased_actor(id).ok().flatten())
                    .flatten();
                patient = erased.is_some();
                erased
            })?;
            pre_kms::keys::public_key_from_bytes(&key).ok()
        })?;
        let role = if patient {
            Role::Patient
        } else {
            self.actor(&actor_id)
                .map(|a| a.role)
                .ok_or(ServiceError::Unauthenticated(AuthError::UnknownActor))?
        };
        Ok(Caller { actor_id, role })
    }

    pub fn actor(&self, actor_id: &str) -> Option<Actor> {
        self.actors
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(actor_id)
            .cloned()
    }

    /// Registers an actor (operator only, or the bootstrap operator at first start).
    pub fn register_actor(&self, actor: Actor) -> ServiceResult<Actor> {
        let key = pre_kms::keys::public_key_from_bytes(&actor.verifying_key).map_err(|_| {
            ServiceError::InvalidArgument(
                "verifying_key must be a 33-byte compressed public key".into(),
            )
        })?;
        let actor_id = pre_kms::keys::actor_id(&key);
        if let Some(existing) = self.actor(&actor_id) {
            if existing.role != actor.role {
                return Err(ServiceError::FailedPrecondition(format!(
                    "this key is already registered as {}; use a separate key per role",
                    existing.role
                )));
            }
            return Ok(existing);
        }
        if actor.name.trim().is_empty() {
            return Err(ServiceError::InvalidArgument(
                "an actor needs a name".into(),
            ));
        }
        let actor = Actor {
            actor_id: actor_id.clone(),
            ..actor
        };
        // Records are re-encrypted to researchers' encryption keys: a researcher proves
        // that its key is its own when it registers. Other roles may register one too.
        if actor.role == Role::Researcher || !actor.encryption_key.is_empty() {
            pre_kms::keys::check_actor_keys(&actor).map_err(|_| {
                ServiceError::InvalidArgument(
                    "the encryption key and key binding do not verify: register with the .pub file that `brokerctl keygen` wrote (it carries both)".into(),
                )
            })?;
        }
        self.db().insert_actor(&actor, now_secs())?;
        self.actors
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(actor_id, actor.clone());
        Ok(actor)
    }

    pub fn list_actors(&self) -> Vec<Actor> {
        let mut actors: Vec<Actor> = self
            .actors
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        actors.sort_by(|a, b| (a.role.as_str(), &a.name).cmp(&(b.role.as_str(), &b.name)));
        actors
    }
}
