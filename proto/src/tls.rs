//! TLS on every connection, with pinned certificates instead of certificate authorities.
//!
//! Each server (the broker, each proxy node) makes its own self-signed certificate the
//! first time it starts (`tls.crt`, and `tls.key` owner-only, in its directory), for
//! `localhost`, `127.0.0.1`, `::1` and any names it is told. Clients pin that certificate:
//! it is the only root they accept, so a server that cannot show it is not talked to. The
//! broker pins each proxy's certificate; patients, custodians, boards, sponsors and
//! researchers pin the broker's (from the network manifest or `--broker-cert`).
//!
//! Plain http exists for tests only, behind [`ClientTls::InsecureLoopback`] on the client
//! and [`ServerTls::InsecureLoopback`] on the server, and only on loopback addresses.

use std::net::IpAddr;
use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, ServerTlsConfig};
use zeroize::Zeroizing;

pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// Why TLS could not be set up. Messages name files and addresses, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("cannot write {0}: {1}")]
    Write(String, std::io::Error),
    #[error("{0} is not a PEM certificate")]
    NotACertificate(String),
    #[error("cannot make a TLS certificate: {0}")]
    Generate(String),
    #[error("address {0}: {1}")]
    Address(String, String),
    #[error(
        "{0} is plain http: the connection would not be encrypted or authenticated. Use the https address with the server's pinned certificate (or --insecure-loopback for a test server on this machine)"
    )]
    Plaintext(String),
    #[error("--insecure-loopback is for servers on this machine only, not {0}")]
    NotLoopback(String),
}

/// A server's certificate and private key.
pub struct ServerCert {
    pub cert_pem: String,
    key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert").finish_non_exhaustive()
    }
}

impl ServerCert {
    /// Loads `dir/tls.crt` and `dir/tls.key`, or makes a self-signed pair valid for
    /// loopback and `names` and writes it (the key owner-only).
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<ServerCert, TlsError> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        let shown = |p: &Path| p.display().to_string();
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path)
                .map_err(|e| TlsError::Read(shown(&cert_path), e))?;
            let key_pem = Zeroizing::new(
                std::fs::read_to_string(&key_path)
                    .map_err(|e| TlsError::Read(shown(&key_path), e))?,
            );
            return Ok(ServerCert { cert_pem, key_pem });
        }
        let mut sans = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
        sans.extend(names.iter().filter(|n| !n.is_empty()).cloned());
        let made = rcgen::generate_simple_self_signed(sans)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let cert = ServerCert {
            cert_pem: made.cert.pem(),
            key_pem: Zeroizing::new(made.signing_key.serialize_pem()),
        };
        pre_kms::private_fs::write_private(&key_path, cert.key_pem.as_bytes())
            .map_err(|e| TlsError::Write(shown(&key_path), e))?;
        std::fs::write(&cert_path, &cert.cert_pem)
            .map_err(|e| TlsError::Write(shown(&cert_path), e))?;
        Ok(cert)
    }

    pub fn config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            &self.cert_pem,
            self.key_pem.as_bytes(),
        ))
    }
}

/// How a server accepts connections.
#[derive(Debug)]
pub enum ServerTls {
    Tls(ServerCert),
    /// Plain http, for tests; refused unless the listener is on a loopback address.
    InsecureLoopback,
}

impl ServerTls {
    /// The URL scheme clients use.
    pub fn scheme(&self) -> &'static str {
        match self {
            ServerTls::Tls(_) => "https",
            ServerTls::InsecureLoopback => "http",
        }
    }

    /// The certificate clients pin, when serving TLS.
    pub fn cert_pem(&self) -> Option<&str> {
        match self {
            ServerTls::Tls(c) => Some(&c.cert_pem),
            ServerTls::InsecureLoopback => None,
        }
    }

    /// Applies this to a tonic server bound at `addr`.
    pub fn apply(
        &self,
        server: tonic::transport::Server,
        addr: std::net::SocketAddr,
    ) -> Result<tonic::transport::Server, TlsError> {
        match self {
            ServerTls::Tls(cert) => server
                .tls_config(cert.config())
                .map_err(|e| TlsError::Generate(e.to_string())),
            ServerTls::InsecureLoopback if addr.ip().is_loopback() => Ok(server),
            ServerTls::InsecureLoopback => Err(TlsError::NotLoopback(addr.to_string())),
        }
    }
}

/// How a client reaches a server.
#[derive(Debug, Clone)]
pub enum ClientTls {
    /// TLS, accepting only this certificate (PEM).
    Pinned(String),
    /// Plain http to a loopback address, for tests.
    InsecureLoopback,
}

impl ClientTls {
    /// The pinned certificate, if any.
    pub fn pinned_pem(&self) -> Option<&str> {
        match self {
            ClientTls::Pinned(pem) => Some(pem),
            ClientTls::InsecureLoopback => None,
        }
    }

    /// Pins the certificate in `path`.
    pub fn pinned_file(path: &Path) -> Result<ClientTls, TlsError> {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| TlsError::Read(path.display().to_string(), e))?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(TlsError::NotACertificate(path.display().to_string()));
        }
        Ok(ClientTls::Pinned(pem))
    }

    /// An endpoint for `url`: https with the pinned certificate as the only root, or
    /// plain http to loopback when insecure. Anything else is refused before connecting.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let bad = |e: &dyn std::fmt::Display| TlsError::Address(url.to_owned(), e.to_string());
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| bad(&e))?;
        let uri = endpoint.uri().clone();
        match (self, uri.scheme_str()) {
            (ClientTls::Pinned(pem), Some("https")) => endpoint
                .tls_config(
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem.as_bytes())),
                )
                .map_err(|e| bad(&e)),
            (ClientTls::Pinned(_), _) => Err(TlsError::Plaintext(url.to_owned())),
            (ClientTls::InsecureLoopback, Some("http")) => {
                let host = uri.host().unwrap_or_default();
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let loopback =
                    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
                if loopback {
                    Ok(endpoint)
                } else {
                    Err(TlsError::NotLoopback(url.to_owned()))
                }
            }
            (ClientTls::InsecureLoopback, _) => {
                Err(bad(&"use an http:// address with --insecure-loopback"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback_and_only_when_asked() {
        let pinned = ClientTls::Pinned("-----BEGIN CERTIFICATE-----".into());
        assert!(matches!(
            pinned.endpoint("http://127.0.0.1:1"),
            Err(TlsError::Plaintext(_))
        ));
        let insecure = ClientTls::InsecureLoopback;
        assert!(insecure.endpoint("http://127.0.0.1:1").is_ok());
        assert!(insecure.endpoint("http://[::1]:1").is_ok());
        assert!(matches!(
            insecure.endpoint("http://10.0.0.1:1"),
            Err(TlsError::NotLoopback(_))
        ));
    }

    #[test]
    fn a_server_certificate_is_made_once_with_an_owner_only_key() {
        let dir = tempfile::tempdir().unwrap();
        let first = ServerCert::load_or_create(dir.path(), &["broker.example".into()]).unwrap();
        let again = ServerCert::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(first.cert_pem, again.cert_pem);
        assert!(first.cert_pem.contains("BEGIN CERTIFICATE"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
