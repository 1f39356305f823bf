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

impl GuideError {
    /// The metric label of this error (the `outcome` of dlm_guide_requests_total).
    pub fn label(&self) -> &'static str {
        match self {
            GuideError::InvalidArgument(_) => "invalid_argument",
            GuideError::NotFound(_) => "not_found",
            GuideError::Unavailable(_) => "unavailable",
            GuideError::FailedPrecondition(_) => "failed_precondition",
            GuideError::Internal(_) => "internal",
        }
    }
}

/// Longest message a client gets (some echo user input).
const MAX_MESSAGE_CHARS: usize = 1024;

impl From<ort::Error> for GuideError {
    fn from(e: ort::Error) -> Self {
        GuideError::Internal(format!("ONNX Runtime: {e}"))
    }
}

impl From<GuideError> for tonic::Status {
    fn from(e: GuideError) -> Self {
        use tonic::Code;
        let (code, m) = match e {
            GuideError::InvalidArgument(m) => (Code::InvalidArgument, m),
            GuideError::NotFound(m) => (Code::NotFound, m),
            GuideError::Unavailable(m) => (Code::Unavailable, m),
            GuideError::FailedPrecondition(m) => (Code::FailedPrecondition, m),
            GuideError::Internal(m) => (Code::Internal, m),
        };
        tonic::Status::new(code, dlm_proto::guide_contract::clip(&m, MAX_MESSAGE_CHARS))
    }
}
