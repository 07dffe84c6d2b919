//! A study's research purpose, as its sponsor declares it and its board approves it: what
//! consent policies (GA4GH DUO terms) are matched against.

use serde::{Deserialize, Serialize};

/// What kind of research a study does (the primary part of its research purpose).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StudyFocus {
    /// Research on these diseases (`SYSTEM:CODE` codes).
    Disease(Vec<String>),
    /// Health, medical or biomedical research not tied to a disease.
    Health,
    /// Research outside health (e.g. social science, fundamental biology).
    General,
    /// The study of population origins or ancestry.
    Ancestry,
    /// Development of statistical methods, software or algorithms.
    MethodsDevelopment,
}

/// A study's research purpose, as its sponsor declared it and its board approved it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResearchPurpose {
    pub focus: StudyFocus,
    /// Commercial use. The engine also counts a for-profit sponsor as commercial.
    pub commercial: bool,
    /// An ethics board (IRB/ERB) approved the study.
    pub irb_approved: bool,
    /// The study commits to publish its results.
    pub will_publish: bool,
    /// The study commits to collaborate with the primary investigators.
    pub will_collaborate: bool,
    /// The study commits to return derived data to the resource.
    pub will_return_data: bool,
    /// When the study intends to stop using the data (unix seconds).
    pub ends_at: Option<i64>,
    /// Where the data will be used (a region code such as `EU`, `NL`, `US-CA`).
    pub region: Option<String>,
    /// The study is genetic research.
    pub genetic: bool,
}

impl ResearchPurpose {
    /// A purpose with the given focus and every commitment and flag off.
    pub fn new(focus: StudyFocus) -> ResearchPurpose {
        ResearchPurpose {
            focus,
            commercial: false,
            irb_approved: false,
            will_publish: false,
            will_collaborate: false,
            will_return_data: false,
            ends_at: None,
            region: None,
            genetic: false,
        }
    }
}
