//! TLS on a migration channel (rustls on ring), under QEMU's names: `tls-creds` is a
//! directory with ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem and
//! client-key.pem; `tls-hostname` is the name the source checks in the destination's
//! certificate (by default the host of a tcp: address); authentication is mutual (the
//! destination checks the source's certificate against the same CA); `tls-authz` lists the
//! source certificate subjects the destination lets in (empty: any the CA signed).

use crate::channel::{Stream, Uri};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{self, Read, Write};
use std::sync::Arc;
pub use vmm_proto::channel::Creds;

/// One side's TLS settings; vmm-core read the files (this process reaches none).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// The tls-creds directory, for messages.
    pub dir: String,
    pub creds: Creds,
    pub hostname: String,
    pub authz: Vec<String>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS channel could not be set up: credentials, names, or the handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls-creds {0}: {1} is not PEM certificates ({2})")]
    NotPem(
        String,
        &'static str,
        #[source] rustls::pki_types::pem::Error,
    ),
    #[error("tls-creds {0}: {1} holds no certificate")]
    NoCertificate(String, &'static str),
    #[error("tls-creds {0}: cannot read the key {1} ({2})")]
    Key(
        String,
        &'static str,
        #[source] rustls::pki_types::pem::Error,
    ),
    #[error("tls-creds {0}: {1}: {2}")]
    Creds(String, &'static str, #[source] rustls::Error),
    #[error("tls-creds {0}: ca-cert.pem: {1}")]
    Verifier(String, #[source] rustls::server::VerifierBuilderError),
    #[error("{0}: with TLS over a channel other than tcp:, pass tls-hostname (the name in the destination's certificate)")]
    NoHostname(Uri),
    #[error("tls-hostname {0}: not a host name or address ({1})")]
    Hostname(String, #[source] rustls::pki_types::InvalidDnsNameError),
    #[error("{0}")]
    Versions(#[source] rustls::Error),
    #[error("{0}: {1}")]
    Connection(Uri, #[source] rustls::Error),
    #[error("{}: {}", .0, explain(.1, .2))]
    Handshake(Uri, #[source] io::Error, &'static str),
    #[error("{0}: the source's certificate subject {1:?} is not in tls-authz; refused")]
    Unauthorized(Uri, String),
    #[error("{0}: {1}")]
    Io(Uri, #[source] io::Error),
}

fn certs(
    tls: &Tls,
    pem: &[u8],
    file: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let list = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NotPem(tls.dir.clone(), file, e))?;
    if list.is_empty() {
        return Err(TlsError::NoCertificate(tls.dir.clone(), file));
    }
    Ok(list)
}

fn key(tls: &Tls, file: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&tls.creds.key)
        .map_err(|e| TlsError::Key(tls.dir.clone(), file, e))
}

fn roots(tls: &Tls) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(tls, &tls.creds.ca, "ca-cert.pem")? {
        roots
            .add(c)
            .map_err(|e| TlsError::Creds(tls.dir.clone(), "ca-cert.pem", e))?;
    }
    Ok(roots)
}

/// What a failed handshake means, for people: rustls's own error (inside the io::Error that
/// `complete_io` returns) tells which check failed.
fn explain(e: &io::Error, side: &str) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<E>());
    let hint = match tls {
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => format!(
            "the {side}'s certificate is not signed by the CA in tls-creds (ca-cert.pem); give both ends the same CA"
        ),
        Some(E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
            "the destination's certificate is not for this name; pass tls-hostname with the name in its certificate".to_string()
        }
        Some(E::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        )) => format!("the {side}'s certificate is outside its validity period"),
        Some(E::NoCertificatesPresented) => {
            "the source sent no client certificate (client-cert.pem); authentication is mutual".to_string()
        }
        Some(E::InvalidMessage(_)) => {
            format!("the {side} does not speak TLS (is it migrating without tls-creds?)")
        }
        Some(E::AlertReceived(A::UnknownCA | A::BadCertificate | A::CertificateUnknown)) => {
            format!("the {side} refused our certificate: it is not signed by the {side}'s CA")
        }
        Some(E::AlertReceived(A::CertificateRequired)) => format!(
            "the {side} wants a client certificate (client-cert.pem); authentication is mutual"
        ),
        _ if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ) =>
        {
            format!("the {side} closed the connection during the TLS handshake (it refused our certificate, or does not expect TLS; see its log)")
        }
        _ => String::new(),
    };
    if hint.is_empty() {
        format!("TLS handshake failed ({e})")
    } else {
        format!("TLS handshake failed ({e}): {hint}")
    }
}

struct Wrapped<C, S>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    tls: rustls::StreamOwned<C, Box<dyn Stream>>,
    raw: Box<dyn Stream>,
}

impl<C, S> Read for Wrapped<C, S>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        // A connection that ends without close_notify may have been cut by anyone on the path
        // (a truncation attack): never an end of the stream, as QEMU 10 holds too.
        self.tls.read(b).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without TLS close_notify: the stream may have been truncated on the way, so it is refused",
                )
            } else {
                e
            }
        })
    }
}

impl<C, S> Write for Wrapped<C, S>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.tls.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tls.flush()
    }
}

impl<C, S> Stream for Wrapped<C, S>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>> + Send + 'static,
    S: rustls::SideData + 'static,
{
    fn shutdown(&self) {
        self.raw.shutdown()
    }
    fn handle(&self) -> io::Result<Box<dyn Stream>> {
        self.raw.handle()
    }
    fn shrink_buffers(&self) {
        self.raw.shrink_buffers()
    }
    fn split(self: Box<Self>) -> io::Result<crate::channel::Halves> {
        let rustls::StreamOwned { conn, sock } = self.tls;
        let (r, w) = sock.split()?;
        let conn = Arc::new(std::sync::Mutex::new(conn));
        Ok((
            Box::new(DuplexReader {
                conn: conn.clone(),
                sock: r,
                buf: vec![0; 64 << 10],
                filled: 0..0,
            }),
            Box::new(DuplexWriter {
                conn,
                sock: w,
                out: Vec::new(),
            }),
        ))
    }
}

/// The reading half of a TLS connection whose writing half another thread uses. The
/// connection's state is shared under a lock that is never held across socket I/O: the
/// socket is read without it, and the records are handed to rustls under it.
struct DuplexReader<C> {
    conn: Arc<std::sync::Mutex<C>>,
    sock: Box<dyn Read + Send>,
    buf: Vec<u8>,
    /// What was read from the socket and not yet handed to rustls.
    filled: std::ops::Range<usize>,
}

impl<C, S> Read for DuplexReader<C>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut c = self.conn.lock().unwrap();
                match c.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection without TLS close_notify: the stream may have been truncated on the way, so it is refused",
                        ))
                    }
                    Err(e) => return Err(e),
                }
                if !self.filled.is_empty() {
                    let mut rest = &self.buf[self.filled.clone()];
                    let n = c.read_tls(&mut rest)?;
                    self.filled.start += n;
                    c.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    continue;
                }
            }
            let n = self.sock.read(&mut self.buf)?;
            if n == 0 {
                // The end of the socket: rustls says whether it came after close_notify.
                let mut c = self.conn.lock().unwrap();
                c.read_tls(&mut &[][..])?;
                c.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            self.filled = 0..n;
        }
    }
}

/// The writing half: records are made under the lock, then written without it (in order:
/// only this half writes to the socket).
struct DuplexWriter<C> {
    conn: Arc<std::sync::Mutex<C>>,
    sock: Box<dyn Write + Send>,
    out: Vec<u8>,
}

impl<C, S> DuplexWriter<C>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        self.out.clear();
        let n = {
            let mut c = self.conn.lock().unwrap();
            let n = c.writer().write(data)?;
            while c.wants_write() {
                c.write_tls(&mut self.out)?;
            }
            n
        };
        self.sock.write_all(&self.out)?;
        Ok(n)
    }
}

impl<C, S> Write for DuplexWriter<C>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.send(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send(&[])?;
        self.sock.flush()
    }
}

/// The source's end: a TLS client that presents client-cert.pem and checks the
/// destination's certificate against ca-cert.pem for `tls-hostname` (or the tcp host).
pub fn client(uri: &Uri, tls: &Tls, mut s: Box<dyn Stream>) -> Result<Box<dyn Stream>, TlsError> {
    let name = match (&tls.hostname, uri.host()) {
        (h, _) if !h.is_empty() => h.clone(),
        (_, Some(host)) => host.to_string(),
        _ => return Err(TlsError::NoHostname(uri.clone())),
    };
    let server_name =
        ServerName::try_from(name.clone()).map_err(|e| TlsError::Hostname(name, e))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?
        .with_root_certificates(roots(tls)?)
        .with_client_auth_cert(
            certs(tls, &tls.creds.cert, "client-cert.pem")?,
            key(tls, "client-key.pem")?,
        )
        .map_err(|e| TlsError::Creds(tls.dir.clone(), "client-cert.pem and client-key.pem", e))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name)
        .map_err(|e| TlsError::Connection(uri.clone(), e))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut s)
            .map_err(|e| TlsError::Handshake(uri.clone(), e, "destination"))?;
    }
    let raw = s.handle().map_err(|e| TlsError::Io(uri.clone(), e))?;
    Ok(Box::new(Wrapped {
        tls: rustls::StreamOwned::new(conn, s),
        raw,
    }))
}

/// The destination's end: a TLS server with server-cert.pem that requires a client
/// certificate signed by ca-cert.pem, whose subject tls-authz lists (when it lists any).
pub fn server(uri: &Uri, tls: &Tls, mut s: Box<dyn Stream>) -> Result<Box<dyn Stream>, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(tls)?),
        provider(),
    )
    .build()
    .map_err(|e| TlsError::Verifier(tls.dir.clone(), e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(tls, &tls.creds.cert, "server-cert.pem")?,
            key(tls, "server-key.pem")?,
        )
        .map_err(|e| TlsError::Creds(tls.dir.clone(), "server-cert.pem and server-key.pem", e))?;
    // A migration never resumes a session: no tickets, so nothing is written after the
    // handshake that a source which has gone could break.
    config.send_tls13_tickets = 0;
    let mut conn = rustls::ServerConnection::new(Arc::new(config))
        .map_err(|e| TlsError::Connection(uri.clone(), e))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut s)
            .map_err(|e| TlsError::Handshake(uri.clone(), e, "source"))?;
    }
    if !tls.authz.is_empty() {
        let subject = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| subject(c.as_ref()))
            .unwrap_or_else(|| "(unreadable)".into());
        if !tls.authz.iter().any(|a| a == &subject) {
            return Err(TlsError::Unauthorized(uri.clone(), subject));
        }
    }
    let raw = s.handle().map_err(|e| TlsError::Io(uri.clone(), e))?;
    Ok(Box::new(Wrapped {
        tls: rustls::StreamOwned::new(conn, s),
        raw,
    }))
}

/// One DER element: (tag, contents, the rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&l, b) = b.split_first()?;
    let (len, b) = if l < 0x80 {
        (usize::from(l), b)
    } else {
        let n = usize::from(l & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |a, &x| (a << 8) | usize::from(x));
        (len, &b[n..])
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// A certificate's subject as "CN=...,O=..." (attributes in the certificate's order).
/// webpki (rustls's own parser) finds the subject; this only spells its attributes out.
pub fn subject(cert: &[u8]) -> Option<String> {
    let der_cert = CertificateDer::from(cert);
    let parsed = webpki::EndEntityCert::try_from(&der_cert).ok()?;
    let mut name = parsed.subject();
    let mut parts = Vec::new();
    while !name.is_empty() {
        let (_, set, r) = der(name)?;
        name = r;
        let (_, atv, _) = der(set)?;
        let (_, oid, r) = der(atv)?;
        let (_, value, _) = der(r)?;
        let key = match oid {
            [0x55, 0x04, 0x03] => "CN".to_string(),
            [0x55, 0x04, 0x06] => "C".into(),
            [0x55, 0x04, 0x07] => "L".into(),
            [0x55, 0x04, 0x08] => "ST".into(),
            [0x55, 0x04, 0x0a] => "O".into(),
            [0x55, 0x04, 0x0b] => "OU".into(),
            other => format!("OID{other:02x?}"),
        };
        parts.push(format!("{key}={}", String::from_utf8_lossy(value)));
    }
    Some(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    struct Ca {
        params: rcgen::CertificateParams,
        key: rcgen::KeyPair,
        pem: String,
    }

    fn ca(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    fn leaf(ca: &Ca, cn: &str, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names = names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "vmm tests");
        let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
        (
            params.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }

    /// The two sides' TLS settings from one CA: the destination's with a server certificate
    /// for dest.test, the source's with a client certificate with CN=`client`.
    fn creds(ca: &Ca, client: &str) -> (Tls, Tls) {
        let (sc, sk) = leaf(ca, "dest", &["dest.test"]);
        let (cc, ck) = leaf(ca, client, &[]);
        let side = |cert: String, key: String| Tls {
            dir: "/test-creds".into(),
            creds: Creds {
                ca: ca.pem.clone().into_bytes(),
                cert: cert.into_bytes(),
                key: key.into_bytes(),
            },
            hostname: "dest.test".into(),
            authz: vec![],
        };
        (side(sc, sk), side(cc, ck))
    }

    /// Why one end of a test handshake failed, as its message.
    #[derive(Debug, PartialEq)]
    struct Refusal(String);

    impl Refusal {
        fn contains(&self, s: &str) -> bool {
            self.0.contains(s)
        }
    }

    /// Runs a handshake between the two; sends a line through when both succeed.
    fn pair(
        client_tls: Option<&Tls>,
        server_tls: &Tls,
    ) -> (Result<(), Refusal>, Result<(), Refusal>) {
        let uri = Uri::Unix("/x".into());
        let (a, b) = UnixStream::pair().unwrap();
        let st = server_tls.clone();
        let server = std::thread::spawn(move || {
            let u = Uri::Unix("/x".into());
            let mut s = server(&u, &st, Box::new(b)).map_err(|e| Refusal(e.to_string()))?;
            let mut got = [0u8; 5];
            s.read_exact(&mut got).map_err(|e| Refusal(e.to_string()))?;
            assert_eq!(&got, b"hello");
            Ok(())
        });
        // The client's end stays open until the server is done.
        let (c, _open) = match client_tls {
            Some(t) => match client(&uri, t, Box::new(a)) {
                Ok(mut s) => {
                    let r = s.write_all(b"hello").and_then(|_| s.flush());
                    (r.map_err(|e| Refusal(e.to_string())), Some(s))
                }
                Err(e) => (Err(Refusal(e.to_string())), None),
            },
            None => {
                let mut a = a;
                a.write_all(b"hello, this is not TLS at all\n").unwrap();
                (Ok(()), Some(Box::new(a) as Box<dyn Stream>))
            }
        };
        (c, server.join().unwrap())
    }

    #[test]
    fn mutual_tls_passes_data_and_authz_lets_in_the_listed_subject() {
        let ca = ca("ca");
        let (mut d, _) = creds(&ca, "dest");
        let (_, s) = creds(&ca, "source");
        d.authz = vec!["CN=source,O=vmm tests".into()];
        let (c, sv) = pair(Some(&s), &d);
        assert_eq!(c, Ok(()));
        assert_eq!(sv, Ok(()));
    }

    /// Split in halves, a TLS connection carries 64 MiB one way while small messages go the
    /// other way at the same time (post-copy's pages and page requests), each intact, and a
    /// close_notify ends the reading half cleanly.
    #[test]
    fn a_split_tls_connection_carries_both_ways_at_once() {
        let ca = ca("ca");
        let (d, s) = creds(&ca, "source");
        let (a, b) = UnixStream::pair().unwrap();
        let uri = Uri::Unix("/x".into());
        let server = std::thread::spawn(move || {
            let u = Uri::Unix("/x".into());
            let (mut r, w) = server(&u, &d, Box::new(b)).unwrap().split().unwrap();
            // Requests go back while the bulk comes in.
            let requests = std::thread::spawn(move || {
                let mut w = w;
                for i in 0u32..2000 {
                    w.write_all(&i.to_le_bytes()).unwrap();
                    w.flush().unwrap();
                }
                w
            });
            let mut sum = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0usize;
            let end = loop {
                match r.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => {
                        total += n;
                        sum += buf[..n].iter().map(|&b| u64::from(b)).sum::<u64>();
                    }
                    Err(e) => break Some(e.kind()),
                }
            };
            drop(requests.join().unwrap());
            (total, sum, end)
        });
        let (mut r, mut w) = client(&uri, &s, Box::new(a)).unwrap().split().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = [0u8; 4];
            for i in 0u32..2000 {
                r.read_exact(&mut got).unwrap();
                assert_eq!(u32::from_le_bytes(got), i);
            }
        });
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..64 {
            w.write_all(&chunk).unwrap();
        }
        w.flush().unwrap();
        reader.join().unwrap();
        // Cut without close_notify: the reading half says so, never a clean end.
        drop(w);
        let (total, sum, end) = server.join().unwrap();
        assert_eq!(total, 64 << 20);
        assert_eq!(sum, 64 * chunk.iter().map(|&b| u64::from(b)).sum::<u64>());
        assert_eq!(end, Some(std::io::ErrorKind::UnexpectedEof));
    }

    #[test]
    fn each_refusal_says_why() {
        let ca1 = ca("ca");
        let (d, _) = creds(&ca1, "dest");
        // Another CA: the source refuses the destination's certificate.
        let (_, stranger) = creds(&ca("other"), "source");
        let (c, sv) = pair(Some(&stranger), &d);
        assert!(c.unwrap_err().contains("not signed by the CA in tls-creds"));
        assert!(sv.is_err());
        // The wrong host name.
        let (_, mut wrong) = creds(&ca1, "source");
        wrong.hostname = "wrong.test".into();
        let (c, _) = pair(Some(&wrong), &d);
        assert!(c.unwrap_err().contains("pass tls-hostname"));
        // Plain bytes to a TLS server.
        let (_, sv) = pair(None, &d);
        assert!(sv.unwrap_err().contains("does not speak TLS"));
        // A subject tls-authz does not list.
        let mut picky = d.clone();
        picky.authz = vec!["CN=someone else".into()];
        let (_, s) = creds(&ca1, "source");
        let (_, sv) = pair(Some(&s), &picky);
        assert!(sv
            .unwrap_err()
            .contains("\"CN=source,O=vmm tests\" is not in tls-authz"));
        // Files that hold no certificate.
        let empty = Tls {
            dir: "/empty".into(),
            hostname: "dest.test".into(),
            ..Default::default()
        };
        let (a, _b) = UnixStream::pair().unwrap();
        let e = client(&Uri::Unix("/x".into()), &empty, Box::new(a))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tls-creds /empty: ca-cert.pem holds no certificate"),
            "{e}"
        );
    }

    #[test]
    fn subject_reads_a_certificate_s_names_in_order() {
        let ca = ca("ca");
        let (pem, _) = leaf(&ca, "source", &[]);
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(
            subject(der.as_ref()).as_deref(),
            Some("CN=source,O=vmm tests")
        );
        assert_eq!(subject(&[0x30, 0x05, 1, 2]), None);
    }
}
