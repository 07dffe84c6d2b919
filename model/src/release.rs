//! A release as the researcher sees it when it is fixed.

/// A fixed release: which study, how many patients and envelopes, and the threshold of
/// capsule fragments each envelope comes with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Release {
    pub release_id: String,
    pub study_id: String,
    pub subjects: u32,
    pub envelopes: u32,
    pub created_at: i64,
    pub threshold: u32,
}
