//! The one error type of this crate. Messages name the file, field or flag at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed CSV: {message}")]
    Csv { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("invalid argument `{field}`: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Longest message a client gets (some echo user input).
pub const MAX_MESSAGE_CHARS: usize = 1024;

impl Error {
    /// The one table: each cause's gRPC code and its `status` label in
    /// `dlm_generator_requests_total`.
    pub fn code_and_label(&self) -> (tonic::Code, &'static str) {
        use tonic::Code;
        match self {
            Error::InvalidArgument { .. } => (Code::InvalidArgument, "invalid_argument"),
            Error::Unavailable(_) => (Code::Unavailable, "unavailable"),
            Error::ResourceExhausted(_) => (Code::ResourceExhausted, "resource_exhausted"),
            Error::DeadlineExceeded(_) => (Code::DeadlineExceeded, "deadline_exceeded"),
            Error::NotFound(_) => (Code::NotFound, "not_found"),
            Error::FailedPrecondition(_) => (Code::FailedPrecondition, "failed_precondition"),
            Error::PermissionDenied(_) => (Code::PermissionDenied, "permission_denied"),
            Error::Io { .. }
            | Error::Csv { .. }
            | Error::Format { .. }
            | Error::Internal(_)
            | Error::Checkpoint(_)
            | Error::Tokenizer(_)
            | Error::Candle(_) => (Code::Internal, "internal"),
        }
    }
}

/// Errors as gRPC statuses, messages capped in length.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let (code, _) = e.code_and_label();
        tonic::Status::new(
            code,
            dlm_proto::guide_contract::clip(&e.to_string(), MAX_MESSAGE_CHARS),
        )
    }
}
