//! What an etcd refusal means, read from what the TLS and gRPC layers say: a certificate
//! rustls rejected, a TLS alert, wrong credentials, missing permissions, or a bare close.

use std::path::PathBuf;

use super::EtcdOptions;
use crate::subnet::SubnetError;

/// A refusal that retrying cannot fix (certificate, credentials, permissions) as an error that
/// names the flag to change; `None` for anything else (etcd down, network).
pub(super) fn diagnose(opts: &EtcdOptions, e: &etcd_client::Error) -> Option<SubnetError> {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return None;
    };
    let endpoints = opts.endpoints.join(",");
    let auth = |fix: String| SubnetError::Auth {
        endpoints: endpoints.clone(),
        reason: status.message().to_string(),
        fix,
    };
    match (status.code(), &opts.username) {
        // etcd answers a bad password and a missing user name with InvalidArgument.
        (tonic::Code::InvalidArgument | tonic::Code::Unauthenticated, Some(user)) => {
            return Some(auth(format!(
                "check --etcd-username ({user}) and --etcd-password against etcd's users (`etcdctl user list`)"
            )))
        }
        (tonic::Code::InvalidArgument | tonic::Code::Unauthenticated, None) => {
            return Some(auth(
                "etcd has authentication enabled: pass --etcd-username and --etcd-password".into(),
            ))
        }
        (tonic::Code::PermissionDenied, user) => {
            return Some(auth(format!(
                "grant user {} read and write on the prefix: `etcdctl role grant-permission <role> --prefix=true readwrite {}`",
                user.as_deref().unwrap_or("(none)"),
                opts.prefix
            )))
        }
        _ => {}
    }
    let tls = |reason: String, fix: String| {
        Some(SubnetError::Tls {
            endpoints: endpoints.clone(),
            reason,
            fix,
        })
    };
    let shown = |p: &Option<PathBuf>| {
        p.as_ref()
            .map_or("none".into(), |p| p.display().to_string())
    };
    match tls_failure(status) {
        Some(TlsFailure::Rustls(
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
            | rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext {
                ..
            }),
        )) => tls(
            "etcd's certificate does not name the endpoint's host".into(),
            "use an endpoint host that etcd's certificate lists in its subjectAltName, or reissue the certificate".into(),
        ),
        Some(TlsFailure::Rustls(e @ rustls::Error::InvalidCertificate(_))) => tls(
            format!("etcd's certificate is not trusted ({e})"),
            format!(
                "pass the CA that signed etcd's --cert-file with --etcd-cafile (now: {})",
                shown(&opts.cafile)
            ),
        ),
        Some(TlsFailure::Rustls(e @ rustls::Error::AlertReceived(_))) => tls(
            format!("etcd rejected our client certificate ({e})"),
            client_cert_fix(opts),
        ),
        Some(TlsFailure::Rustls(e)) => tls(
            e.to_string(),
            "check --etcd-cafile, --etcd-certfile and --etcd-keyfile".into(),
        ),
        // tokio-rustls hands a received alert up as a plain InvalidData I/O error: the server
        // ended the handshake, which with client-cert-auth means our certificate.
        Some(TlsFailure::Alert(e)) => tls(
            format!("etcd rejected our client certificate ({e})"),
            client_cert_fix(opts),
        ),
        // With TLS 1.3 the client finishes its handshake before the server checks the client
        // certificate; etcd then just closes the connection, which is all we see.
        // Depending on timing the close shows as a cancelled request or as a broken pipe.
        // A transient reset looks the same, so this is only a refusal when it repeats
        // (see `EtcdStore::connect`).
        None if uses_tls(opts) && closed_by_peer(status) => Some(SubnetError::ClosedAfterHandshake {
            endpoints: endpoints.clone(),
        }),
        None => None,
    }
}

/// Whether the request died because etcd closed the connection under it.
fn closed_by_peer(status: &tonic::Status) -> bool {
    if status.code() == tonic::Code::Cancelled {
        return true;
    }
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
            if matches!(io.kind(), BrokenPipe | ConnectionReset) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

fn uses_tls(opts: &EtcdOptions) -> bool {
    opts.endpoints.iter().any(|e| e.starts_with("https://"))
}

pub(super) fn client_cert_fix(opts: &EtcdOptions) -> String {
    match &opts.certfile {
        Some(cert) => format!(
            "--etcd-certfile {} must be signed by a CA in etcd's --trusted-ca-file",
            cert.display()
        ),
        None => "etcd wants a client certificate (--client-cert-auth): pass --etcd-certfile and --etcd-keyfile".into(),
    }
}

/// What ended a TLS handshake, found behind a gRPC status (tonic -> hyper -> io::Error).
enum TlsFailure<'a> {
    Rustls(&'a rustls::Error),
    Alert(&'a std::io::Error),
}

fn tls_failure(status: &tonic::Status) -> Option<TlsFailure<'_>> {
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(TlsFailure::Rustls(t));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(TlsFailure::Rustls(t));
            }
            if io.kind() == std::io::ErrorKind::InvalidData {
                return Some(TlsFailure::Alert(io));
            }
        }
        next = e.source();
    }
    None
}

/// Whether `e` says the request never reached a member: the connection to the endpoint it was
/// sent to was refused or unreachable (a member removed or restarting). Sending it again is
/// then safe, transactions included.
pub(super) fn never_sent(e: &etcd_client::Error) -> bool {
    use std::io::ErrorKind::{ConnectionRefused, HostUnreachable, NetworkUnreachable};
    // etcd-client's error does not chain to the gRPC status it wraps.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        e => Some(e),
    };
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ConnectionRefused | HostUnreachable | NetworkUnreachable
            );
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::never_sent;

    /// A real request to a loopback port nobody listens on: refused before anything is sent.
    #[tokio::test]
    async fn a_refused_connection_is_a_request_never_sent() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // The listener is dropped: the port is closed now.
        let mut client = etcd_client::Client::connect([format!("http://127.0.0.1:{port}")], None)
            .await
            .expect("a lazy client connects without a server");
        let e = client.get("k", None).await.expect_err("nobody listens");
        assert!(never_sent(&e), "{e:?}");
        let e = etcd_client::Error::InvalidArgs("no".into());
        assert!(!never_sent(&e), "{e:?}");
    }
}
