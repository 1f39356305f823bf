//! The guide's one error type, and its mapping to gRPC status codes (the only place that does it).

#[derive(Debug, thiserror::Error)]
pub enum GuideError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, GuideError>;

impl GuideError {
    pub fn invalid(message: impl Into<String>) -> Self {
        GuideError::InvalidArgument(message.into())
    }
}

impl From<ort::Error> for GuideError {
    fn from(e: ort::Error) -> Self {
        GuideError::Internal(format!("ONNX Runtime: {e}"))
    }
}

impl From<GuideError> for tonic::Status {
    fn from(e: GuideError) -> Self {
        match e {
            GuideError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            GuideError::NotFound(m) => tonic::Status::not_found(m),
            GuideError::Unavailable(m) => tonic::Status::unavailable(m),
            GuideError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            GuideError::Internal(m) => tonic::Status::internal(m),
        }
    }
}
