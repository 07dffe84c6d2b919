//! Which role may call which method: the one table, checked once, by
//! [`crate::service::Broker::authorize`] for every call.

use broker_proto::methods as m;
use model::Role;

const ANY: &[Role] = &Role::ALL;
const PATIENT_SIDE: &[Role] = &[Role::Patient, Role::Custodian];
const OPERATOR: &[Role] = &[Role::Operator];
const SPONSOR: &[Role] = &[Role::Sponsor];
const BOARD: &[Role] = &[Role::Board];
const RESEARCHER: &[Role] = &[Role::Researcher];
const PATIENT: &[Role] = &[Role::Patient];
const CLINICIAN: &[Role] = &[Role::Clinician];
/// The board lists actors to check a study's researcher and receiving key before it
/// signs an approval, and to draft the network manifest with the operator.
const OPERATOR_OR_BOARD: &[Role] = &[Role::Operator, Role::Board];

/// Every broker method and the roles that may call it.
pub const ACCESS: &[(&str, &[Role])] = &[
    (m::REGISTER_ACTOR, OPERATOR),
    (m::LIST_ACTORS, OPERATOR_OR_BOARD),
    (m::WHOAMI, ANY),
    (m::LIST_PROXIES, ANY),
    (m::ENROLL, PATIENT_SIDE),
    (m::UPLOAD, PATIENT_SIDE),
    (m::ERASE, PATIENT_SIDE),
    (m::PROPOSE, SPONSOR),
    (m::DECIDE, BOARD),
    (m::LIST_STUDIES, ANY),
    (m::GET_STUDY, ANY),
    (m::ISSUE_GRANTS, PATIENT_SIDE),
    (m::WITHDRAW_GRANTS, PATIENT_SIDE),
    (m::REQUEST_RELEASE, RESEARCHER),
    (m::FETCH_RELEASE, RESEARCHER),
    (m::AUDIT_CHECKPOINT, ANY),
    (m::AUDIT_CHECKPOINTS, BOARD),
    (m::AUDIT_CONSISTENCY, BOARD),
    (m::AUDIT_EVENTS, BOARD),
    (m::AUDIT_COSIGN, BOARD),
    (m::AUDIT_ACCESSES, PATIENT),
    (m::AUDIT_ALERTS, PATIENT),
    (m::AUDIT_NOTICES, RESEARCHER),
    (m::SET_CONSENTS, PATIENT_SIDE),
    (m::CONSENT_HISTORY, PATIENT_SIDE),
    (m::COUNT, &[Role::Sponsor, Role::Board]),
    (m::PUT_CONCEPTS, &[Role::Custodian, Role::Operator]),
    (m::REGISTER_EMERGENCY_ORG, OPERATOR),
    (m::LIST_EMERGENCY_ORGS, ANY),
    (m::BREAK_GLASS, CLINICIAN),
    (m::REOPEN_BREAK_GLASS, CLINICIAN),
    (m::LIST_BREAK_GLASS, BOARD),
    (m::REVIEW_BREAK_GLASS, BOARD),
];

/// The roles that may call `method`; none for a method not in the table.
pub fn allowed(method: &str) -> &'static [Role] {
    ACCESS
        .iter()
        .find(|(name, _)| *name == method)
        .map_or(&[], |(_, roles)| roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_in_the_table_once() {
        for (i, (method, roles)) in ACCESS.iter().enumerate() {
            assert!(!roles.is_empty(), "{method} has no role");
            assert!(
                ACCESS[i + 1..].iter().all(|(other, _)| other != method),
                "{method} is listed twice"
            );
        }
        assert!(allowed("/broker.v1.Nope/Nothing").is_empty());
        assert_eq!(allowed(m::DECIDE), &[Role::Board]);
    }
}
