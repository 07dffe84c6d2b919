//! Servers that lie to clients, for the tests of what a client must not believe.

use broker_proto::v1 as pb;

/// A broker that answers releases with subjects of its choosing.
pub struct HostileReleases {
    pub subjects: Vec<String>,
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
            subjects: self.subjects.len() as u32,
            envelopes: self.subjects.len() as u32,
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
        let items: Vec<Result<pb::ReleaseItem, tonic::Status>> = self
            .subjects
            .iter()
            .map(|s| {
                Ok(pb::ReleaseItem {
                    subject: s.clone(),
                    category: "conditions".into(),
                    version: 1,
                    ..Default::default()
                })
            })
            .collect();
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(items))))
    }
}
