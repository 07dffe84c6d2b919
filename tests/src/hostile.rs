//! Servers that lie to clients, for the tests of what a client must not believe.

use broker_proto::v1 as pb;

/// A broker that answers releases with items of its choosing.
pub struct HostileReleases {
    pub items: Vec<pb::ReleaseItem>,
}

impl HostileReleases {
    /// Items that name these subjects and carry nothing else.
    pub fn with_subjects(subjects: &[&str]) -> HostileReleases {
        HostileReleases {
            items: subjects
                .iter()
                .map(|s| pb::ReleaseItem {
                    subject: (*s).to_owned(),
                    category: "conditions".into(),
                    version: 1,
                    ..Default::default()
                })
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl pb::releases_server::Releases for HostileReleases {
    async fn request(
        &self,
        _: tonic::Request<pb::RequestReleaseRequest>,
    ) -> Result<tonic::Response<pb::Release>, tonic::Status> {
        Ok(tonic::Response::new(pb::Release {
            release_id: "rel-x".into(),
            study_id: "st-x".into(),
            subjects: self.items.len() as u32,
            envelopes: self.items.len() as u32,
            created_at: 0,
            threshold: 2,
        }))
    }

    type FetchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ReleaseItem, tonic::Status>> + Send>,
    >;

    async fn fetch(
        &self,
        _: tonic::Request<pb::FetchReleaseRequest>,
    ) -> Result<tonic::Response<Self::FetchStream>, tonic::Status> {
        let items: Vec<Result<pb::ReleaseItem, tonic::Status>> =
            self.items.iter().cloned().map(Ok).collect();
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(items))))
    }
}
