//! The API's error vocabulary, mapped to gRPC codes and HTTP statuses here and nowhere
//! else.

/// What went wrong with an API call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{field} = {value:?} is invalid, allowed: {allowed}")]
    InvalidArgument { field: &'static str, value: String, allowed: String },
    /// A recipe refused by validation: every problem, each with its field, value and
    /// allowed range.
    #[error("recipe refused: {0}")]
    InvalidRecipe(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A device did not answer in time; trying again later may work.
    #[error("{0}")]
    DeviceUnavailable(String),
}

impl Error {
    /// A refused argument: which field, the value given, what is allowed.
    pub fn invalid(field: &'static str, value: impl Into<String>, allowed: impl Into<String>) -> Error {
        Error::InvalidArgument { field, value: value.into(), allowed: allowed.into() }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Error::NotFound { .. } => tonic::Code::NotFound,
            Error::InvalidArgument { .. } | Error::InvalidRecipe(_) => tonic::Code::InvalidArgument,
            Error::Conflict(_) => tonic::Code::FailedPrecondition,
            Error::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Error::Unavailable(_) | Error::DeviceUnavailable(_) => tonic::Code::Unavailable,
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            Error::NotFound { .. } => 404,
            Error::InvalidArgument { .. } | Error::InvalidRecipe(_) => 400,
            Error::Conflict(_) => 409,
            Error::Unauthenticated(_) => 401,
            Error::PermissionDenied(_) => 403,
            Error::Unavailable(_) | Error::DeviceUnavailable(_) => 503,
        }
    }
}

impl From<nanofleet_store::Error> for Error {
    fn from(e: nanofleet_store::Error) -> Self {
        tracing::error!(error = %e, "storage error");
        Error::Unavailable(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}
