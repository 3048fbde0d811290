//! The committed Mosquitto configuration (`deploy/mosquitto/`) enforces the device rules
//! of the embedded broker. A Mosquitto process of its own (on a free port, in a temporary
//! directory, with a fresh fleet CA) runs the committed `nanofleet.conf` and
//! `nanofleet.acl`, and Mosquitto's own clients (`mosquitto_pub`, `mosquitto_sub`,
//! MQTT 5, QoS 1) try what a device and the ingest consumer may and may not do.
//! Skips (with the reason) where Mosquitto or its clients are not installed.

use std::io::{BufRead as _, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nanofleet_pki::{DeviceIdentity, FleetCa, ServerNames};
use nanofleet_tests::skip_or_fail;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Where the committed configuration expects its files.
const INSTALL_DIR: &str = "/etc/mosquitto/nanofleet/";
/// The ingest consumer's certificate name, as in the committed ACL.
const INGEST: &str = "nanofleet:ingest";
const DEVICE_A: &str = "NF-A-01";
const DEVICE_B: &str = "NF-B-01";
/// Longest wait for anything that should happen.
const PATIENCE: Duration = Duration::from_secs(8);

// === harness ===

fn committed(file: &str) -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto").join(file);
    std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The committed configuration with its one listener moved to `port` on loopback and
/// its files in `dir`; everything else as committed.
fn render(conf: &str, dir: &Path, port: u16) -> anyhow::Result<String> {
    let listeners = conf.lines().filter(|l| l.trim_start().starts_with("listener")).count();
    anyhow::ensure!(listeners == 1, "nanofleet.conf must configure exactly one listener, found {listeners}");
    let mut out = String::new();
    for line in conf.lines() {
        if line.starts_with("listener ") {
            out.push_str(&format!("listener {port} 127.0.0.1"));
        } else {
            out.push_str(&line.replace(INSTALL_DIR, &format!("{}/", dir.display())));
        }
        out.push('\n');
    }
    // The files are in the test's private temporary directory: run as root, Mosquitto
    // would switch to the mosquitto user, who cannot read them. Ignored by non-root.
    out.push_str("user root\n");
    let stray = out.lines().find(|l| !l.starts_with('#') && l.contains("/etc/"));
    anyhow::ensure!(stray.is_none(), "a path in nanofleet.conf is not under {INSTALL_DIR}: {stray:?}");
    Ok(out)
}

/// A port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The test's Mosquitto process, killed when dropped (also on panic).
struct Broker {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Broker {
    fn start(dir: &Path, conf: &str) -> anyhow::Result<Broker> {
        let port = free_port()?;
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, render(conf, dir, port)?)?;
        let log = dir.join("mosquitto.log");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf_path)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()?;
        let mut broker = Broker { child, port, log };
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = broker.child.try_wait()? {
                anyhow::bail!("mosquitto exited ({status}) at start:\n{}", broker.log());
            }
            anyhow::ensure!(Instant::now() < deadline, "mosquitto does not listen:\n{}", broker.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(broker)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client certificate chain and its key, as files.
struct Identity {
    cert: PathBuf,
    key: PathBuf,
}

fn issue(ca: &FleetCa, dir: &Path, name: &str) -> anyhow::Result<Identity> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let who = DeviceIdentity { device_id: name.into(), site_id: "site-a".into() };
    let issued = ca.issue_device_cert(csr.der(), &who, Duration::from_secs(3600))?;
    let stem = name.replace(':', "_");
    let id = Identity { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) };
    std::fs::write(&id.cert, issued.chain_pem)?;
    std::fs::write(&id.key, key.serialize_pem())?;
    Ok(id)
}

/// Connection arguments for the Mosquitto clients: TLS trusting `root` when given, the
/// client certificate when given.
fn connect_args(port: u16, root: Option<&Path>, who: Option<&Identity>) -> Vec<String> {
    let mut args: Vec<String> =
        ["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5", "-q", "1"].map(String::from).into();
    if let Some(root) = root {
        args.extend(["--cafile".into(), root.display().to_string()]);
    }
    if let Some(who) = who {
        args.extend(["--cert".into(), who.cert.display().to_string()]);
        args.extend(["--key".into(), who.key.display().to_string()]);
    }
    args
}

/// Runs a client to its end, killing it after `PATIENCE`.
fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("{cmd:?} still running after {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child.wait_with_output()?)
}

/// What one `mosquitto_pub` run reported.
struct Published {
    ok: bool,
    stderr: String,
}

impl Published {
    fn refused_as_not_authorized(&self) -> bool {
        self.stderr.contains("Not authorized")
    }
}

fn publish(args: &[String], extra: &[&str], topic: &str, payload: &str) -> anyhow::Result<Published> {
    let out = run(Command::new("mosquitto_pub").args(args).args(extra).args(["-t", topic, "-m", payload]))?;
    Ok(Published { ok: out.status.success(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() })
}

/// A running `mosquitto_sub` (debug output on, so its connects and SUBACKs show) whose
/// output lines arrive on a channel; killed when dropped.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Sub {
    /// Connects, subscribes to `filters` and waits for the SUBACK.
    fn start(args: &[String], extra: &[&str], filters: &[&str]) -> anyhow::Result<Sub> {
        // Line-buffered, so the debug lines (CONNECT, SUBACK) arrive as they happen.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub"]).args(args).args(extra).args(["-d", "-v", "-W", "15"]);
        for f in filters {
            cmd.args(["-t", f]);
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let (tx, lines) = mpsc::channel();
        forward(child.stdout.take(), tx.clone());
        forward(child.stderr.take(), tx);
        let mut sub = Sub { child, lines, seen: Vec::new() };
        sub.until(|l| l.starts_with("Subscribed (mid"))?;
        Ok(sub)
    }

    /// Reads output until a line satisfies `done`.
    fn until(&mut self, done: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let last = done(&line);
                    self.seen.push(line);
                    if last {
                        return Ok(());
                    }
                }
                Err(e) => {
                    anyhow::bail!("mosquitto_sub: {e} before the expected line; output:\n{:#?}", self.seen)
                }
            }
        }
    }

    /// Waits for the message `topic payload`, then returns every message received so far.
    fn messages_until(&mut self, topic: &str, payload: &str) -> anyhow::Result<Vec<String>> {
        let marker = format!("{topic} {payload}");
        self.until(|l| l == marker)?;
        Ok(self.seen.iter().filter(|l| l.starts_with("nf/v1/")).cloned().collect())
    }

    /// How many times it sent CONNECT: more than once means it lost its connection.
    fn connects(&self) -> usize {
        self.seen.iter().filter(|l| l.ends_with("sending CONNECT")).count()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward(stream: Option<impl Read + Send + 'static>, tx: mpsc::Sender<String>) {
    if let Some(stream) = stream {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
}

fn topic(device: &str, channel: &str) -> String {
    format!("nf/v1/{device}/{channel}")
}

// === tests ===

#[test]
fn committed_mosquitto_config_enforces_the_device_rules() -> anyhow::Result<()> {
    if !Path::new(MOSQUITTO).exists() {
        skip_or_fail(&format!("{MOSQUITTO} is not installed (Debian package mosquitto)"));
        return Ok(());
    }
    if Command::new("mosquitto_pub").arg("--help").output().is_err() {
        skip_or_fail("mosquitto_pub is not installed (Debian package mosquitto-clients)");
        return Ok(());
    }
    // The ACL's consumer account must be a name enrollment can never give a device.
    assert!(nanofleet_proto::topics::validate_device_id(INGEST).is_err());
    assert!(committed("nanofleet.acl")?.lines().any(|l| l == format!("user {INGEST}")));

    nanofleet_pki::install_crypto_provider();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let ca = FleetCa::load_or_create(&dir.join("pki"), &ServerNames::default())?;
    let foreign = FleetCa::load_or_create(&dir.join("foreign-pki"), &ServerNames::default())?;

    // The files as an operator installs them (deploy/mosquitto/README.md).
    let ca_pem =
        std::fs::read_to_string(ca.root_path())? + &std::fs::read_to_string(ca.device_bundle_path())?;
    std::fs::write(dir.join("ca.pem"), ca_pem)?;
    std::fs::copy(ca.server_cert_path(), dir.join("server.pem"))?;
    std::fs::copy(ca.server_key_path(), dir.join("server.key"))?;
    std::fs::write(dir.join("nanofleet.acl"), committed("nanofleet.acl")?)?;
    let broker = Broker::start(dir, &committed("nanofleet.conf")?)?;

    let a = issue(&ca, dir, DEVICE_A)?;
    let b = issue(&ca, dir, DEVICE_B)?;
    let ingest = issue(&ca, dir, INGEST)?;
    let impostor = issue(&foreign, dir, "NF-A-01-foreign")?;
    let root = ca.root_path();
    let tls = |who: &Identity| connect_args(broker.port, Some(&root), Some(who));
    let ctx = || format!("broker log:\n{}", broker.log());

    // --- publishing: own prefix only ---
    let mut ingest_sub =
        Sub::start(&tls(&ingest), &[], &["nf/v1/+/telemetry", "nf/v1/+/state"]).with_context(ctx)?;
    let own = publish(&tls(&a), &[], &topic(DEVICE_A, "telemetry"), "a-own")?;
    assert!(own.ok && own.stderr.is_empty(), "A's own telemetry: {}; {}", own.stderr, ctx());
    let as_b = publish(&tls(&a), &[], &topic(DEVICE_B, "telemetry"), "a-as-b")?;
    assert!(
        as_b.refused_as_not_authorized(),
        "A publishing as B: PUBACK not authorized; got {:?}",
        as_b.stderr
    );
    // Claiming B's client id changes nothing: the identity is the certificate's.
    let as_b_id = publish(&tls(&a), &["-i", DEVICE_B], &topic(DEVICE_B, "state"), "a-as-b-client-id")?;
    assert!(as_b_id.refused_as_not_authorized(), "A with B's client id: {:?}", as_b_id.stderr);
    // B's birth (retained), then B's telemetry: everything before it has been routed.
    assert!(publish(&tls(&b), &["-r"], &topic(DEVICE_B, "state"), "b-birth")?.ok);
    assert!(publish(&tls(&b), &[], &topic(DEVICE_B, "telemetry"), "b-own")?.ok);
    let got = ingest_sub.messages_until(&topic(DEVICE_B, "telemetry"), "b-own").with_context(ctx)?;
    assert_eq!(
        got,
        [
            format!("{} a-own", topic(DEVICE_A, "telemetry")),
            format!("{} b-birth", topic(DEVICE_B, "state")),
            format!("{} b-own", topic(DEVICE_B, "telemetry")),
        ],
        "the consumer receives exactly the authorized publishes; {}",
        ctx()
    );
    drop(ingest_sub);

    // --- subscribing: only the own prefix is delivered ---
    // A subscribes to B's prefix, every device's telemetry and everything, under B's
    // client id; then B connects and listens for its commands. Mosquitto grants every
    // SUBSCRIBE and checks each message (retained ones too) before delivering it.
    let mut a_sub = Sub::start(&tls(&a), &["-i", DEVICE_B], &["nf/v1/NF-B-01/#", "nf/v1/+/telemetry", "#"])
        .with_context(ctx)?;
    assert!(publish(&tls(&b), &[], &topic(DEVICE_B, "telemetry"), "b-tel")?.ok, "{}", ctx());
    let mut b_sub = Sub::start(&tls(&b), &["-i", DEVICE_B], &["nf/v1/NF-B-01/cmd/#"]).with_context(ctx)?;
    // The consumer writes commands but cannot speak for a device.
    let forged = publish(&tls(&ingest), &[], &topic(DEVICE_A, "telemetry"), "ingest-as-a")?;
    assert!(forged.refused_as_not_authorized(), "ingest publishing telemetry: {:?}", forged.stderr);
    assert!(publish(&tls(&ingest), &[], &topic(DEVICE_B, "cmd/start"), "b-cmd")?.ok, "{}", ctx());
    assert!(publish(&tls(&ingest), &[], &topic(DEVICE_A, "cmd/start"), "a-cmd")?.ok, "{}", ctx());
    let got = a_sub.messages_until(&topic(DEVICE_A, "cmd/start"), "a-cmd").with_context(ctx)?;
    assert_eq!(
        got,
        [format!("{} a-cmd", topic(DEVICE_A, "cmd/start"))],
        "A receives only its own; {}",
        ctx()
    );
    let got = b_sub.messages_until(&topic(DEVICE_B, "cmd/start"), "b-cmd").with_context(ctx)?;
    assert_eq!(got, [format!("{} b-cmd", topic(DEVICE_B, "cmd/start"))]);
    // A's connection with B's client id and B's own did not take each other over.
    assert_eq!(
        (a_sub.connects(), b_sub.connects()),
        (1, 1),
        "a reconnect: {:#?} {:#?}; {}",
        a_sub.seen,
        b_sub.seen,
        ctx()
    );
    drop((a_sub, b_sub));

    // --- who may connect at all ---
    let refused = |what: &str, args: Vec<String>| -> anyhow::Result<()> {
        let p = publish(&args, &[], &topic(DEVICE_A, "telemetry"), what)?;
        // The broker closed the connection (not a client-side usage error).
        let closed = p.stderr.contains("connection was lost") || p.stderr.contains("Protocol error");
        assert!(
            !p.ok && closed,
            "{what}: expected the broker to close the connection, got {:?}; {}",
            p.stderr,
            ctx()
        );
        Ok(())
    };
    refused("plaintext", connect_args(broker.port, None, None))?;
    refused("plaintext with a username", {
        let mut args = connect_args(broker.port, None, None);
        args.extend(["-u", DEVICE_A, "-P", "x"].map(String::from));
        args
    })?;
    refused("TLS without a client certificate", connect_args(broker.port, Some(&root), None))?;
    refused("a certificate from another CA", tls(&impostor))?;
    Ok(())
}
