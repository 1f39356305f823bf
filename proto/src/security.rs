//! What both servers need to close their control plane: the admin token and TLS flags
//! (`ServerSecurity`, flattened into each binary's `serve` flags), the admin-call check, and the
//! TLS configurations built from PEM files.
//!
//! Admin calls carry metadata `authorization: Bearer <token>`; the token is read from
//! `--admin-token-file` and compared in constant time. Without the flag, admin calls are disabled.

use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerSecurity {
    /// File holding the admin token. Admin calls (the generator's SetGuide/RemoveGuide, the
    /// guide's RepositoryModelLoad/Unload) need metadata `authorization: Bearer <token>`; without
    /// this flag they are disabled (PERMISSION_DENIED).
    #[arg(long, env = "DLM_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "DLM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "DLM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "DLM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl ServerSecurity {
    pub fn admin_token(&self) -> Result<AdminToken, String> {
        let Some(path) = &self.admin_token_file else {
            return Ok(AdminToken(None));
        };
        let text = read(path, "admin token file")?;
        let token = String::from_utf8_lossy(&text).trim().to_string();
        if token.len() < 16 {
            return Err(format!(
                "admin token file {}: the token must be at least 16 characters",
                path.display()
            ));
        }
        Ok(AdminToken(Some(token.into_bytes())))
    }

    /// The server's TLS configuration, None for plaintext.
    pub fn server_tls(&self) -> Result<Option<ServerTlsConfig>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
            read(cert, "TLS certificate")?,
            read(key, "TLS key")?,
        ));
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "TLS client CA")?));
        }
        Ok(Some(tls))
    }
}

/// The TLS configuration of a client: trust `ca` (else the system's roots are not used: a CA is
/// required), present `cert`/`key` when the server wants client certificates.
pub fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientTlsConfig, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "TLS CA")?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            read(cert, "TLS client certificate")?,
            read(key, "TLS client key")?,
        ));
    }
    Ok(tls)
}

/// The admin token (None: admin calls disabled).
#[derive(Clone)]
pub struct AdminToken(Option<Vec<u8>>);

impl AdminToken {
    pub fn disabled() -> Self {
        AdminToken(None)
    }

    /// Ok when `req` carries the token; PERMISSION_DENIED when admin calls are disabled,
    /// UNAUTHENTICATED when the header is missing or wrong.
    pub fn authorize<T>(&self, req: &Request<T>, call: &str) -> Result<(), Status> {
        let Some(token) = &self.0 else {
            return Err(Status::permission_denied(format!(
                "{call} is an admin call, disabled on this server (start it with --admin-token-file)"
            )));
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        match given {
            Some(g) if bool::from(g.ct_eq(token)) => Ok(()),
            Some(_) => Err(Status::unauthenticated(format!(
                "{call}: wrong admin token"
            ))),
            None => Err(Status::unauthenticated(format!(
                "{call} needs metadata `authorization: Bearer <admin token>`"
            ))),
        }
    }
}
