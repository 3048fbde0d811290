//! `nanofleet`: the server, the demo and the operator CLI in one binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nanofleet::cli::{Client, Output};
use nanofleet::demo::{self, Demo};
use nanofleet::server::{self, DEFAULT_GRPC, DEFAULT_HTTP, DEFAULT_MQTT, Server};
use nanofleet_agent::process;
use nanofleet_proto::v1 as pb;

/// jemalloc, not the system's allocator: under a steady stream of messages from
/// thousands of connections, glibc's per-thread arenas keep freed memory, and the
/// server's resident memory grows for as long as it runs while its live heap stays
/// flat. jemalloc hands unused pages back after a few seconds. See
/// docs/decisions/0010-memory-allocator.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Nanofleet: the fleet platform for point-of-care LNP formulation devices.
///
/// Start with `nanofleet demo`: a server, its embedded MQTT broker, SQLite, the web
/// dashboard and a simulated fleet of hospitals, in one process. Then ask it about the
/// fleet with the commands below, from another terminal.
#[derive(Parser, Debug)]
#[command(name = "nanofleet", version, propagate_version = true, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "Examples:
  nanofleet demo                                  # everything, with 3 hospitals x 8 devices
  export NANOFLEET_CA_FILE=DATA_DIR/pki/root.pem  # the CLI checks the server against the fleet root
  nanofleet devices list                          # every device, its presence and last values
  nanofleet sites create city-general --name 'City General Pharmacy' --time-zone Europe/London
  nanofleet enroll-token create --site city-general --expires 24h --uses 1
  nanofleet devices decommission NF-SMH-03 --reason 'pump housing cracked'
  nanofleet devices list --site st-marys-london --output json
  nanofleet devices show NF-SMH-01
  nanofleet telemetry NF-SMH-01 --since 5m";

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server: embedded MQTT broker for devices, ingest into storage, gRPC API
    /// and web dashboard.
    Server(ServerArgs),
    /// Run the server with a simulated fleet of hospitals, in a temporary data
    /// directory unless --data-dir is given. Ctrl-C stops everything.
    Demo(DemoArgs),
    /// Sites (hospital pharmacies).
    Sites {
        #[command(subcommand)]
        command: SitesCommand,
    },
    /// Devices, their presence and last values.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Stored telemetry samples of one device.
    Telemetry(TelemetryArgs),
    /// One-time, site-scoped, expiring tokens with which devices enroll (hospital IT).
    #[command(name = "enroll-token")]
    EnrollToken {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The fleet CA on this machine (run where the server's data directory is).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// People and their roles: ops, site-it, pharmacist, qa, auditor.
    People {
        #[command(subcommand)]
        command: PeopleCommand,
    },
    /// API tokens for scripts and this CLI.
    #[command(name = "api-token")]
    ApiToken {
        #[command(subcommand)]
        command: ApiTokenCommand,
    },
    /// Who the API token in use belongs to.
    Whoami {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The audit trail: every change of state, hash-chained, with signed checkpoints.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Formulation recipes: a pharmacist drafts and signs, QA approves (a second
    /// person), the recipe is released to its devices, which verify both signatures.
    #[command(after_help = RECIPES_HELP)]
    Recipes {
        #[command(subcommand)]
        command: RecipesCommand,
    },
    /// Firmware releases: upload an image, which the server signs with your firmware
    /// key (TUF metadata) so devices can check it before they install.
    #[command(after_help = FIRMWARE_HELP)]
    Firmware {
        #[command(subcommand)]
        command: FirmwareCommand,
    },
    /// Firmware rollouts: a release offered to a fleet in waves that advance on
    /// success and pause themselves on failures; devices report every step.
    #[command(after_help = ROLLOUTS_HELP)]
    Rollouts {
        #[command(subcommand)]
        command: RolloutsCommand,
    },
    /// Cartridges: the catalogue of types, scans, receipts at a site, movements and
    /// each cartridge's history.
    #[command(after_help = INVENTORY_HELP)]
    Cartridges {
        #[command(subcommand)]
        command: CartridgesCommand,
    },
    /// Cartridge lots: register, release (QA), recall (QA, electronic signature) with
    /// the trace of every run and patient, and the deny list's acknowledgements.
    #[command(after_help = INVENTORY_HELP)]
    Lots {
        #[command(subcommand)]
        command: LotsCommand,
    },
    /// Shipments of cartridges from the manufacturer to a site.
    #[command(after_help = INVENTORY_HELP)]
    Shipments {
        #[command(subcommand)]
        command: ShipmentsCommand,
    },
    /// Stock per site and cartridge type: on hand, consumption per day from real runs,
    /// days of cover, reorder point, the order to place now, and alerts.
    #[command(after_help = INVENTORY_HELP)]
    Stock {
        /// Only this site (site-scoped people see their own).
        #[arg(long, default_value = "")]
        site: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Runs: a pharmacist starts a run on a device of their site; the device checks
    /// its interlocks and answers.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Batch records: what each run made, signed by its device; QA releases or
    /// rejects each batch with an electronic signature.
    #[command(after_help = BATCHES_HELP)]
    Batches {
        #[command(subcommand)]
        command: BatchesCommand,
    },
    /// Cross-site quality: control charts of every quality attribute and process
    /// signal, which device, site, firmware, recipe or cartridge lot differs, and
    /// whether one cohort performs worse than another.
    #[command(after_help = QUALITY_HELP)]
    Quality {
        #[command(subcommand)]
        command: QualityCommand,
    },
    /// Monitoring alerts: control-chart rules that fired on a device, devices gone
    /// silent, sites that differ from the fleet.
    Alerts {
        #[command(subcommand)]
        command: AlertsCommand,
    },
}

const QUALITY_HELP: &str = "\
Metrics: size_nm, pdi, encapsulation_pct, ph, yield_pct (quality attributes) and
flow_cv, max_pressure_mbar, frr_error_pct, alarms (process signals, per batch).

  nanofleet quality health                                  # sites ranked, worst first
  nanofleet quality chart pdi --by device --since 7d        # one I-MR/EWMA/CUSUM chart per device
  nanofleet quality chart size_nm --device NF-SMH-01        # one chart, newest points drawn
  nanofleet quality compare encapsulation_pct --by lot      # which lot differs, adjusted for site etc.
  nanofleet quality gate --a firmware=1.3.0 --b firmware=1.2.0   # exits 1 if A regressed

Limits come from each chart's first --baseline points (default 20). Rules: Western
Electric 1-4, Nelson trend, alternation, stratification and mixture, moving range,
EWMA (λ 0.2, L 3) and CUSUM (k 0.5σ, h 5σ).";

#[derive(clap::Args, Debug)]
struct SelectArgs {
    /// Only these devices (repeat).
    #[arg(long)]
    device: Vec<String>,
    /// Only these sites (repeat).
    #[arg(long)]
    site: Vec<String>,
    /// Only these firmware versions (repeat).
    #[arg(long)]
    firmware: Vec<String>,
    /// Only these recipes (repeat).
    #[arg(long)]
    recipe: Vec<String>,
    /// Only these cartridge lots (repeat).
    #[arg(long)]
    lot: Vec<String>,
    /// Only runs that ended in this window, e.g. 24h, 7d (default: all).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
}

impl SelectArgs {
    fn selection(self) -> pb::BatchSelection {
        pb::BatchSelection {
            device_ids: self.device,
            site_ids: self.site,
            firmware_versions: self.firmware,
            recipe_ids: self.recipe,
            cartridge_lots: self.lot,
            since_unix_ms: since_ms(self.since),
            until_unix_ms: 0,
        }
    }
}

fn since_ms(since: Option<Duration>) -> i64 {
    since.map_or(0, |d| now_ms() - d.as_millis() as i64)
}

#[derive(Subcommand, Debug)]
enum QualityCommand {
    /// Individuals / moving-range chart with EWMA and CUSUM, rules marked, Cpk against
    /// the recipe's release criteria; one chart per stratum with --by.
    Chart {
        /// size_nm, pdi, encapsulation_pct, ph, yield_pct, flow_cv, max_pressure_mbar,
        /// frr_error_pct or alarms.
        metric: String,
        /// One chart per device, site, firmware, recipe or lot.
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        select: SelectArgs,
        /// Limits from the first this many points of each chart.
        #[arg(long, default_value_t = 20)]
        baseline: u32,
        /// Newest points returned per chart (--output json).
        #[arg(long, default_value_t = 500)]
        points: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Which device, site, firmware, recipe or lot differs, by how much, with a 95 %
    /// interval: an additive model adjusted for the other factors, F test, Bonferroni.
    Compare {
        metric: String,
        /// device, site, firmware, recipe or lot.
        #[arg(long)]
        by: String,
        #[command(flatten)]
        select: SelectArgs,
        /// Significance level.
        #[arg(long, default_value_t = 0.01)]
        alpha: f64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The cohort gate: does cohort A perform worse than cohort B? One-sided Welch
    /// tests per metric and Fisher tests on failed batches and runs with alarms,
    /// Holm-adjusted. Exits 1 when A regressed.
    Gate {
        /// Cohort A as KEY=VALUE (device, site, firmware, recipe, lot; repeat).
        #[arg(long = "a", required = true)]
        a: Vec<String>,
        /// Cohort B, the reference.
        #[arg(long = "b", required = true)]
        b: Vec<String>,
        /// Only runs that ended in this window, e.g. 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Family-wise significance level.
        #[arg(long, default_value_t = 0.01)]
        alpha: f64,
        /// Smallest regression that counts, in standard deviations.
        #[arg(long, default_value_t = 0.5)]
        min_effect: f64,
        /// Metrics to compare (repeat; default the quality attributes, flow_cv, frr_error_pct).
        #[arg(long)]
        metric: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Sites ranked worst first by QC pass rate and devices online, with open alerts.
    Health {
        /// Batches that ended in this window count.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        since: Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum AlertsCommand {
    /// Alerts, newest first (default: open and acknowledged).
    List {
        /// open, acknowledged, resolved or all.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value = "")]
        site: String,
        /// spc_rule, device_silent, alarm_storm or site_differs.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Acknowledges an open alert (ops, QA) with what was found or done; audited.
    Ack {
        alert_id: String,
        #[arg(long)]
        note: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Prints alerts as they are raised, acknowledged or resolved.
    Watch {
        #[arg(long, default_value = "")]
        site: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

const BATCHES_HELP: &str = "\
From run to released batch:
  nanofleet runs start --device NF-SMH-01 --recipe flu-h5-mrna --gtin 10614141000019 \\
      --lot L2611 --serial C000123 --expires 2027-03-31 --prescription RX-0042 \\
      --prescribed 2h --patient PT-7F3A                       # pharmacist of the device's site
  nanofleet batches list --disposition awaiting_release       # records arrive when runs end
  nanofleet batches show NF-SMH-01-20261126-101500            # QC against the release criteria
  nanofleet batches release NF-SMH-01-20261126-101500         # QA: password asked
  nanofleet batches export NF-SMH-01-20261126-101500 --format html --out batch.html

A batch that was aborted or failed QC can only be rejected (with --reason).";

#[derive(Subcommand, Debug)]
enum RunsCommand {
    /// Starts a run: recipe, the cartridge loaded in the device (its scan, or its
    /// GTIN, lot, serial and expiry), prescription and pseudonymous patient. The
    /// device reads the scan itself and refuses the run, naming the interlock, unless
    /// the recipe is accepted and valid, the cartridge is of the recipe's type, not
    /// expired, recalled, blocked or used, the prescription is dated before the run
    /// and no run is under way. The device reports the load: `nanofleet cartridges
    /// show` lists it.
    Start {
        #[arg(long)]
        device: String,
        #[arg(long)]
        recipe: String,
        /// 0: the version the device holds.
        #[arg(long, default_value_t = 0)]
        recipe_version: u32,
        /// The cartridge's code as the scanner read it: `]d201…` (GS between
        /// variable-length fields) or the printed `(01)…(17)…(10)…(21)…`.
        #[arg(long, conflicts_with_all = ["gtin", "lot", "serial", "expires"])]
        scan: Option<String>,
        /// Cartridge GTIN-14, AI (01).
        #[arg(long, required_unless_present = "scan")]
        gtin: Option<String>,
        /// Cartridge lot, AI (10).
        #[arg(long, required_unless_present = "scan")]
        lot: Option<String>,
        /// Cartridge serial, AI (21).
        #[arg(long, required_unless_present = "scan")]
        serial: Option<String>,
        /// Cartridge expiry date, AI (17), YYYY-MM-DD.
        #[arg(long, required_unless_present = "scan")]
        expires: Option<String>,
        /// Prescription id.
        #[arg(long)]
        prescription: String,
        /// When the prescription was written: a UTC time (2026-11-26T09:30:00Z) or a
        /// time ago (90m, 2h).
        #[arg(long)]
        prescribed: String,
        /// Pseudonymous patient id (never a name).
        #[arg(long)]
        patient: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum BatchesCommand {
    /// Batches, newest first.
    List {
        #[arg(long, default_value = "")]
        site: String,
        #[arg(long, default_value = "")]
        device: String,
        #[arg(long, default_value = "")]
        recipe: String,
        /// awaiting_release, released, rejected or failed.
        #[arg(long)]
        disposition: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One batch: recipe and its signatures, device, cartridge, prescription, phases,
    /// alarms, QC against the release criteria, QA's decision.
    Show {
        batch_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Releases a batch that passed QC (QA), with your electronic signature.
    Release {
        batch_id: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Your user id; default: the owner of the API token.
        #[arg(long, default_value = "")]
        user: String,
        /// Read the password from the first line of stdin instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Rejects a batch (QA), with your electronic signature and a reason.
    Reject {
        batch_id: String,
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = "")]
        user: String,
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Checks a JSON export without the server: the device's signature over the record,
    /// its certificate's chain to the fleet's device intermediates at the record's time,
    /// and the digest the export states. Exits 1 if anything does not hold.
    Verify {
        /// A file written by `nanofleet batches export --format json`.
        file: PathBuf,
        /// The fleet's device intermediates (DATA_DIR/pki/devices-bundle.pem on the server).
        #[arg(long)]
        devices_ca: PathBuf,
    },
    /// The record as a document: html (printable, every signature with name, time and
    /// meaning) or json (with the signed record, verifiable later).
    Export {
        batch_id: String,
        /// html or json.
        #[arg(long, default_value = "html")]
        format: String,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

const RECIPES_HELP: &str = "\
The flow, one step per person:
  nanofleet recipes example --id flu-h5-mrna --site st-marys-london > flu.json   # start from a valid recipe
  nanofleet recipes draft --file flu.json                         # pharmacist: save (again) until right
  nanofleet recipes sign flu-h5-mrna --version 1 --meaning authored   # pharmacist: password asked
  nanofleet recipes sign flu-h5-mrna --version 1 --meaning approved   # QA, another person: releases it
  nanofleet recipes deliveries flu-h5-mrna                        # which devices accepted it

Each signature records the signer's printed name, the UTC time and its meaning inside
the signed bytes; it cannot be moved to another recipe or version.";

const FIRMWARE_HELP: &str = "Examples:
  nanofleet firmware upload build/nf200-2.4.0.img --model NF-200 --version 2.4.0 \\
      --release-counter 8 --notes \"fixes pump pressure overshoot\"     # asks for your password
  nanofleet firmware list --model NF-200
  nanofleet firmware list --output json

A release is a TUF target (hardware model, version, release counter) in the server's
image repository, signed with your firmware key; the server's online key signs the
snapshot and timestamp. Devices download images over HTTPS (range requests resume a cut
download) and refuse an image for another model, with a lower release counter than they
run, or whose bytes or metadata do not verify.";

const INVENTORY_HELP: &str = "Examples:
  nanofleet cartridges types add --gtin 10614141000019 --name \"FIX-LNP 2 mL\" \\
      --payload \"factor IX mRNA\" --volume-ml 2 --storage-class ultra-cold --lead-time-days 5
  nanofleet lots create --gtin 10614141000019 --lot L2611A --produced 2026-11-02 \\
      --expires 2027-05-31 --quantity 200                   # registered in quarantine
  nanofleet lots release L2611A                             # QA
  nanofleet shipments send --lot L2611A --site city-general --count 40 --codes codes.txt
  nanofleet cartridges receive SH-... --site city-general --scans codes.txt --readings logger.csv
  nanofleet cartridges scan ']d20110614141000019...'        # may it run? why not?
  nanofleet stock --site city-general                       # cover, reorder point, order now
  nanofleet lots recall L2611A --reason \"endotoxin OOS\"     # QA; asks for your password
  nanofleet lots deny-list                                  # who has not acknowledged

Every cartridge is serialised and every movement is an event with who and when; stock
is derived from the events. Scans are GS1 element strings: the scanner's form (]d2, GS
between fields; write GS as \\x1d in files) or the printed form (01)...(17)...(10)...(21)....
A receipt needs the shipment logger's readings (CSV time,celsius); minutes outside the
type's storage class beyond its limit block the cartridges. A recall signs a deny list
with your deny-list key; every device refuses the lot from then on, offline too.";

const ROLLOUTS_HELP: &str = "Examples:
  nanofleet rollouts create --target NF-200-2.4.0.img --canary 2 --waves 10,50,100 \\
      --reason \"pump pressure fix\"
  nanofleet rollouts watch ro-3f2a9c01d4            # live progress until it ends
  nanofleet rollouts show ro-3f2a9c01d4             # every device with its last report
  nanofleet rollouts pause ro-3f2a9c01d4 --reason \"complaint from St Mary's\"
  nanofleet rollouts rollback ro-3f2a9c01d4 --to NF-200-2.3.1.img --reason \"alarm storm\"

A device is offered the release when its wave starts (soft: when its site's maintenance
window is open too), checks the signed offer and the release metadata, downloads over
HTTPS, installs into its inactive slot when no run is under way, boots it on trial and
commits it after its health check; otherwise it rolls back. The next wave starts when
the waves so far reached --success (percent committed); the rollout pauses when the
failed share of a wave reaches --errors. With --health-watch, each wave's devices are
watched that long and their alarms and batch quality compared with devices still on the
old version; a significant regression pauses the rollout (and, with
--rollback-on-regression, offers the updated devices what they ran before); too few
batches to judge watches again, up to four periods, then pauses for a person to resume.
Every decision is in the audit chain.";

#[derive(Subcommand, Debug)]
enum RolloutsCommand {
    /// Starts a rollout of a released image (ops).
    Create {
        /// The release (TUF target name, `nanofleet firmware list`).
        #[arg(long)]
        target: String,
        /// Only these sites (comma-separated).
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        /// Only devices running one of these versions (comma-separated).
        #[arg(long, value_delimiter = ',')]
        from_versions: Vec<String>,
        /// Only devices carrying every one of these tags (comma-separated; nanofleet
        /// devices tag).
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Only these devices (comma-separated).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
        /// Devices in the first wave, before the percentages.
        #[arg(long, default_value_t = 0)]
        canary: u32,
        /// Cumulative percentages of the remaining devices, e.g. 10,50,100.
        #[arg(long)]
        waves: Option<String>,
        /// Exponential waves instead: FIRSTxFACTOR, e.g. 5x2 (5, 10, 20, ... devices).
        #[arg(long)]
        exponential: Option<String>,
        /// Percent of the waves so far committed before the next starts (1-100).
        #[arg(long, default_value_t = 90)]
        success: u32,
        /// Percent of a wave's offered devices failed that pauses the rollout (1-100).
        #[arg(long, default_value_t = 10)]
        errors: u32,
        /// soft (site windows), forced (at once) or download-only.
        #[arg(long, default_value = "soft")]
        action: String,
        /// Offer again (then time out) a device with no final answer after this long.
        #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
        device_timeout: Duration,
        /// Offers per device.
        #[arg(long, default_value_t = 2)]
        attempts: u32,
        /// Health gate: watch each wave's devices this long, then compare their alarms
        /// and batch quality with devices on the old version (0s: no gate).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        health_watch: Duration,
        /// With --health-watch: when the gate finds a regression, also offer the
        /// updated devices the release each ran before (it must have been uploaded).
        #[arg(long, requires = "health_watch")]
        rollback_on_regression: bool,
        /// Why (goes to the audit chain).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One rollout with every device's last report.
    Show {
        rollout_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Rollouts, newest first.
    List {
        /// running, paused, completed or cancelled.
        #[arg(long, default_value = "")]
        state: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follows a rollout live until it ends (Ctrl-C to stop following).
    Watch {
        rollout_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Pauses a running rollout: no new offers, no new wave.
    Pause {
        rollout_id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resumes a paused rollout; the failures seen so far are accepted.
    Resume {
        rollout_id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancels: devices not offered yet are taken out, offers under way withdrawn.
    Cancel {
        rollout_id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Offers an earlier release to the devices this rollout updated (a new forced
    /// rollout) and cancels this one.
    Rollback {
        rollout_id: String,
        /// The release to go back to (TUF target name).
        #[arg(long)]
        to: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum CartridgesCommand {
    /// Cartridge types (GTIN-14).
    Types {
        #[command(subcommand)]
        command: TypesCommand,
    },
    /// Reads a scan and says whether the cartridge may run, and every reason it may not
    /// (exit status 3 when it may not).
    Scan {
        /// The element string as scanned, or the printed form.
        code: String,
        /// Check it for this device too (site, model).
        #[arg(long, default_value = "")]
        device: String,
        /// Check it for this recipe too (its cartridge type).
        #[arg(long, default_value = "")]
        recipe: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Receives a shipment at its site: every cartridge scanned, with the shipment
    /// logger's readings. All or nothing: one bad scan refuses the receipt.
    Receive {
        shipment: String,
        /// The receiving site (the shipment's).
        #[arg(long)]
        site: String,
        /// File of scans, one per line (`-`: stdin).
        #[arg(long)]
        scans: PathBuf,
        /// Logger readings: CSV of time (RFC 3339 or Unix ms) and celsius.
        #[arg(long)]
        readings: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A cartridge and every event of its life.
    Show {
        gtin: String,
        serial: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Records a movement at the site: put away, loaded into a device, or wasted.
    Move {
        gtin: String,
        serial: String,
        /// Put away at this location (e.g. "freezer 2, shelf B").
        #[arg(long, group = "movement")]
        stored: Option<String>,
        /// Loaded into this device.
        #[arg(long, group = "movement")]
        loaded: Option<String>,
        /// Wasted, for this reason.
        #[arg(long, group = "movement")]
        wasted: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum TypesCommand {
    /// Adds a cartridge type (ops).
    Add {
        /// GTIN-14 with its check digit.
        #[arg(long)]
        gtin: String,
        #[arg(long)]
        name: String,
        /// What it holds.
        #[arg(long)]
        payload: String,
        #[arg(long)]
        volume_ml: f64,
        /// ultra-cold (-90 to -60 °C), frozen (-25 to -15 °C) or refrigerated (2 to 8 °C).
        #[arg(long)]
        storage_class: String,
        /// Minutes outside the storage class before a cartridge is blocked.
        #[arg(long, default_value_t = 30)]
        excursion_limit_min: u32,
        /// Device models that take it (comma-separated); none: every model.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Days from order to receipt at a site.
        #[arg(long)]
        lead_time_days: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Every cartridge type with the released recipes made for it.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum LotsCommand {
    /// Registers a lot and its serialised cartridges, in quarantine (ops).
    Create {
        #[arg(long)]
        gtin: String,
        #[arg(long)]
        lot: String,
        /// Production date, YYYY-MM-DD.
        #[arg(long)]
        produced: String,
        /// Expiry date, YYYY-MM-DD.
        #[arg(long)]
        expires: String,
        #[arg(long)]
        quantity: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Releases a lot from quarantine for use (QA).
    Release {
        lot: String,
        /// The cartridge type, when the lot number exists for several.
        #[arg(long, default_value = "")]
        gtin: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lots, newest first.
    List {
        #[arg(long, default_value = "")]
        gtin: String,
        /// quarantine, released or recalled.
        #[arg(long, default_value = "")]
        status: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A lot: where its cartridges are, its recalls, and every run that used it.
    Show {
        lot: String,
        #[arg(long, default_value = "")]
        gtin: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Recalls a lot (QA): your electronic signature, a signed deny list to every
    /// device, and the trace of sites, runs, prescriptions and patients. Asks for your
    /// password.
    Recall {
        lot: String,
        #[arg(long, default_value = "")]
        gtin: String,
        /// Why (goes to the deny list, the audit chain and every device's refusal).
        #[arg(long)]
        reason: String,
        /// Your user id; default: the owner of the API token.
        #[arg(long, default_value = "")]
        user: String,
        /// Read the password from the first line of stdin instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The deny list in force and the devices that have not acknowledged it.
    DenyList {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ShipmentsCommand {
    /// Ships cartridges of a released lot to a site (ops).
    Send {
        #[arg(long)]
        lot: String,
        #[arg(long, default_value = "")]
        gtin: String,
        #[arg(long)]
        site: String,
        #[arg(long)]
        count: u32,
        /// Write the shipped cartridges' codes here, one per line (to print labels or
        /// to scan at receipt).
        #[arg(long)]
        codes: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Shipments, newest first.
    List {
        #[arg(long, default_value = "")]
        site: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum FirmwareCommand {
    /// Uploads an image and releases it (ops). Shows progress; the server checks the
    /// length and SHA-256 before it signs. Asks for your password (the release is signed
    /// with your firmware key).
    #[command(disable_version_flag = true)]
    Upload {
        /// The image file.
        file: PathBuf,
        /// Hardware model it is built for, e.g. NF-200.
        #[arg(long)]
        model: String,
        /// Version, unique per model, e.g. 2.4.0.
        #[arg(long)]
        version: String,
        /// Anti-rollback counter: devices refuse an image below the highest they
        /// committed. Not below the highest released for the model.
        #[arg(long)]
        release_counter: u64,
        /// Why this release (goes to the audit chain).
        #[arg(long)]
        notes: String,
        /// Your user id; default: the owner of the API token.
        #[arg(long, default_value = "")]
        user: String,
        /// Read the password from the first line of stdin instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Released images, the highest release counter first.
    List {
        /// Only this model.
        #[arg(long, default_value = "")]
        model: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum RecipesCommand {
    /// Prints a complete, valid recipe as JSON, to edit and save as a draft.
    Example {
        /// Recipe id: lower case letters, digits and dashes.
        #[arg(long, default_value = "flu-h5-mrna")]
        id: String,
        /// The site it targets.
        #[arg(long, default_value = "st-marys-london")]
        site: String,
    },
    /// Saves a draft from a JSON file (version 0 or absent: the open draft or the next
    /// version). Every field is checked against physical ranges and the hardware
    /// envelope of the device models it names.
    Draft {
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Signs a version with your electronic signature: `authored` (the pharmacist who
    /// drafted it) or `approved` (QA, another person; this releases it). Asks for your
    /// password.
    #[command(disable_version_flag = true)]
    Sign {
        recipe_id: String,
        #[arg(long)]
        version: u32,
        /// authored or approved.
        #[arg(long)]
        meaning: String,
        /// Your user id; default: the owner of the API token.
        #[arg(long, default_value = "")]
        user: String,
        /// Read the password from the first line of stdin instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Sends a draft or authored version back (QA); it is never signed further.
    #[command(disable_version_flag = true)]
    Reject {
        recipe_id: String,
        #[arg(long)]
        version: u32,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One version with its signatures (default: the newest).
    #[command(disable_version_flag = true)]
    Show {
        recipe_id: String,
        #[arg(long, default_value_t = 0)]
        version: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Every version, newest first.
    List {
        /// Only this recipe id.
        #[arg(long, default_value = "")]
        id: String,
        /// draft, authored, released or rejected.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Per device: pending, accepted, or refused with the device's reason.
    #[command(disable_version_flag = true)]
    Deliveries {
        recipe_id: String,
        /// 0: every version.
        #[arg(long, default_value_t = 0)]
        version: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum PeopleCommand {
    /// Adds a person; prints their initial password (only now).
    Add {
        /// Login id, e.g. j.smith.
        id: String,
        /// Printed name, shown on electronic signatures.
        #[arg(long)]
        name: String,
        /// ops, site-it, pharmacist, qa or auditor.
        #[arg(long)]
        role: String,
        /// The site of a site-it or pharmacist.
        #[arg(long, default_value = "")]
        site: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Everyone with role, site and state.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Gives a person another role (and site).
    Grant {
        id: String,
        #[arg(long)]
        role: String,
        #[arg(long, default_value = "")]
        site: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Disables a person: their tokens and sessions stop working at once.
    Disable {
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ApiTokenCommand {
    /// Creates an API token (for yourself, or with --person for someone else as ops).
    Create {
        #[arg(long, default_value = "")]
        person: String,
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        expires: Duration,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revokes an API token.
    Revoke {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Records, oldest first, filtered.
    List {
        #[arg(long)]
        actor: Option<String>,
        /// One action, or a prefix ending in a dot: device.
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        site: Option<String>,
        /// How far back, e.g. 1h, 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Proves the chain intact (exit 0) or names the first broken record (exit 1).
    Verify {
        /// A checkpoint saved earlier with --save-checkpoint, kept off the server.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Saves the newest signed checkpoint here, to check against later.
        #[arg(long)]
        save_checkpoint: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Creates a token and prints it (only now). Hand it to the device:
    /// `nanofleet-agent enroll --server URL --token TOKEN`.
    Create {
        /// Site the enrolled devices belong to.
        #[arg(long)]
        site: String,
        /// How long the token stays usable (60s to 30 days).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// How many devices it may enroll.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// The id the device gets (with --uses 1); otherwise the server assigns one.
        #[arg(long)]
        device_id: Option<String>,
        /// Why (kept in the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Tokens with their uses left and state (usable, used, expired, revoked).
    List {
        #[arg(long)]
        site: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revokes a token that was not used up.
    Revoke {
        /// Token id (the second part of the token, or from `enroll-token list`).
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// The root, device intermediates and server certificate, with fingerprints.
    Show {
        #[arg(long, env = "NANOFLEET_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Installs an existing root CA (your organisation's, PEM certificate and key) into
    /// a data directory before the server's first start; the server then creates the
    /// device intermediate and its certificate under it.
    Import {
        #[arg(long, env = "NANOFLEET_DATA_DIR")]
        data_dir: PathBuf,
        /// The root certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Its private key (PEM, PKCS#8).
        #[arg(long)]
        key: PathBuf,
    },
    /// New device intermediate and server certificate. Stop the server first. Devices
    /// keep working: the old intermediate stays trusted until it expires, and they
    /// receive certificates from the new one when they renew.
    Rotate {
        #[arg(long, env = "NANOFLEET_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ListenArgs {
    /// Directory for the database and state.
    #[arg(long, env = "NANOFLEET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL (sqlite://PATH or postgres://...); default: SQLite in --data-dir.
    #[arg(long, env = "NANOFLEET_DATABASE_URL")]
    database_url: Option<String>,
    /// gRPC API address (port 0 picks a free port).
    #[arg(long, default_value = DEFAULT_GRPC, env = "NANOFLEET_GRPC_LISTEN")]
    grpc_listen: SocketAddr,
    /// Dashboard address.
    #[arg(long, default_value = DEFAULT_HTTP, env = "NANOFLEET_HTTP_LISTEN")]
    http_listen: SocketAddr,
    /// Device MQTT address: mutual TLS, client certificates from the fleet CA required.
    #[arg(long, default_value = DEFAULT_MQTT, env = "NANOFLEET_MQTT_LISTEN")]
    mqtt_listen: SocketAddr,
    /// Also accept plaintext MQTT here, without client certificates. Development only:
    /// refused unless the address is loopback.
    #[arg(long, env = "NANOFLEET_MQTT_PLAINTEXT_DEV")]
    mqtt_plaintext_dev: Option<SocketAddr>,
    /// What devices are told to connect to, HOST:PORT (default: the MQTT listener).
    #[arg(long, env = "NANOFLEET_MQTT_ADVERTISE")]
    mqtt_advertise: Option<String>,
    /// Host names and addresses for the server's TLS certificate (repeat; default
    /// localhost, 127.0.0.1, ::1).
    #[arg(long = "server-name", env = "NANOFLEET_SERVER_NAMES", value_delimiter = ',')]
    server_names: Vec<String>,
    /// Life of a device certificate; devices renew after two thirds of it.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    device_cert_validity: Duration,
    /// POST every new monitoring alert and change of state here as JSON (http:// or
    /// https://).
    #[arg(long, env = "NANOFLEET_ALERT_WEBHOOK")]
    alert_webhook: Option<String>,
    /// A device with no message for this long raises a "silent" alert.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    silent_after: Duration,
    /// Time between evaluations of the alert rules.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    alert_every: Duration,
    /// Keep raw telemetry (every sample) this long; older batches are deleted.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    retain_raw: Duration,
    /// Keep per-minute telemetry rollups this long (at least --retain-raw).
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    retain_minutes: Duration,
    /// Keep per-hour telemetry rollups this long (at least --retain-minutes).
    #[arg(long, default_value = "5years", value_parser = humantime::parse_duration)]
    retain_hours: Duration,
}

#[derive(clap::Args, Debug)]
struct ServerArgs {
    #[command(flatten)]
    listen: ListenArgs,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    #[command(flatten)]
    listen: ListenArgs,
    /// Simulated hospitals.
    #[arg(long, default_value_t = 3)]
    sites: usize,
    /// Simulated devices per hospital.
    #[arg(long, default_value_t = 8)]
    devices_per_site: usize,
    /// Fraction of devices (0 to 1) with an injected fault (clog, bubbles, pump wear, ...).
    /// With a time scale, the first hospital also always has one device with pump wear
    /// and one with slow drift. The banner names them.
    #[arg(long, default_value_t = 0.15)]
    fault_rate: f64,
    /// Weeks in minutes: devices age this many times faster than real time, so a pump
    /// wears out (flow CV 0.07 to 0.3 over 21 simulated days) and a chamber drifts
    /// warmer (0.5 °C per simulated week) while you watch. 2000: a real minute is about
    /// 33 simulated hours, a pump wears out in about 15 minutes. Timestamps stay real.
    /// Allowed 1 to 100000.
    #[arg(long, default_value_t = 2_000.0, value_name = "N")]
    time_scale: f64,
    /// A degraded cartridge lot (particles about 8 nm larger, encapsulation about 6
    /// points lower) that the first hospital holds besides its good lots and loads in
    /// about a third of its runs: the lot comparison should single it out. `none`: no
    /// bad lot.
    #[arg(long, default_value = "L2611-X", value_name = "LOT")]
    bad_lot: String,
}

#[derive(clap::Args, Debug, Clone)]
struct ClientArgs {
    /// Server gRPC address (TLS).
    #[arg(long, global = true, default_value = "https://127.0.0.1:7400", env = "NANOFLEET_SERVER")]
    server: String,
    /// The fleet root certificate the server's must chain to (the server's
    /// DATA_DIR/pki/root.pem; `nanofleet demo` prints it).
    #[arg(long, global = true, env = "NANOFLEET_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// API token (`nanofleet api-token create`; the first start writes one to
    /// DATA_DIR/admin.token).
    #[arg(long, global = true, env = "NANOFLEET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// `table` for people, `json` for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Subcommand, Debug)]
enum SitesCommand {
    /// Every site with its online and total device counts.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Creates a site (a hospital pharmacy).
    Create {
        /// Site id: 2 to 32 of a-z, 0-9 and -, e.g. city-general.
        id: String,
        #[arg(long)]
        name: String,
        /// IANA time zone (maintenance windows use it).
        #[arg(long, default_value = "UTC")]
        time_zone: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Sets when soft firmware rollouts may offer updates to the site's devices, in
    /// the site's time zone: "Mon-Fri 01:00-05:00", "daily 22:00-04:00",
    /// "Sat,Sun 00:00-24:00", several separated by ";". "" opens it always.
    SetWindow {
        site: String,
        window: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum DevicesCommand {
    /// Devices with presence, firmware, run phase, flows and alarm count.
    List {
        /// Only the devices of this site.
        #[arg(long)]
        site: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One device in detail: presence, last values, active alarms.
    Show {
        /// Device id, e.g. NF-SMH-01.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Adds and removes a device's tags (ops; site IT for their site). Rollouts can
    /// select devices by tag: nanofleet rollouts create --tags icu ...
    Tag {
        id: String,
        /// Tags to add (comma-separated): lowercase letters, digits, '-', '_', '.'.
        #[arg(long, value_delimiter = ',')]
        add: Vec<String>,
        /// Tags to remove (comma-separated).
        #[arg(long, value_delimiter = ',')]
        remove: Vec<String>,
        /// Why (required; kept in the audit trail).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cuts a device off at once: its certificates are revoked, its connection is
    /// closed, renewal is refused. Its history stays.
    Decommission {
        id: String,
        /// Why (required; kept in the audit trail).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replaces broken hardware: the old unit is cut off and a one-time token is printed
    /// for the new unit, which keeps the device id, site and history.
    Replace {
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires: Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    nanofleet telemetry NF-SMH-01 --since 30s                 the raw samples\n  \
    nanofleet telemetry NF-SMH-01 --metric total_flow --since 24h\n                                                            one metric, per-minute rollups\n  \
    nanofleet telemetry NF-SMH-01 --metric aqueous_pressure --since 30d --resolution hour --output json")]
struct TelemetryArgs {
    /// Device id, e.g. NF-SMH-01.
    id: String,
    /// How far back, e.g. 30s, 5m, 2h, 30d.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    since: Duration,
    /// At most this many samples (the newest); 0 means the server default (10,000).
    #[arg(long, default_value_t = 0)]
    limit: u32,
    /// Show one metric as a series (count, min, percentiles, mean, max per point)
    /// instead of the raw samples: aqueous_flow, ethanol_flow, total_flow, flow_ratio,
    /// aqueous_pressure, ethanol_pressure, mixer_pressure_drop, chamber_temperature,
    /// cartridge_temperature.
    #[arg(long)]
    metric: Option<String>,
    /// With --metric: auto (the finest whose points fit --points), raw, minute or hour.
    #[arg(long, default_value = "auto", value_parser = nanofleet_api::series::RESOLUTIONS.map(|(n, _)| n))]
    resolution: String,
    /// With --metric: at most this many points; wider windows merge rollups into wider
    /// buckets.
    #[arg(long, default_value_t = 200)]
    points: u32,
    #[command(flatten)]
    client: ClientArgs,
}

impl ClientArgs {
    async fn connect(&self) -> anyhow::Result<Client> {
        Client::connect(&self.server, self.ca_file.as_deref(), self.token.as_deref(), self.output).await
    }
}

/// A role name as the API's enum.
fn role_arg(role: &str) -> i32 {
    let r = match role {
        "ops" => pb::Role::Ops,
        "site-it" => pb::Role::SiteIt,
        "pharmacist" => pb::Role::Pharmacist,
        "qa" => pb::Role::Qa,
        "auditor" => pb::Role::Auditor,
        other => config_error(format!("--role {other:?}: allowed ops, site-it, pharmacist, qa, auditor")),
    };
    r as i32
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A duration as whole seconds for the API (which checks the range).
fn secs(d: Duration, flag: &str) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or_else(|_| config_error(format!("{flag}: too long")))
}

fn config_error(msg: impl std::fmt::Display) -> ! {
    process::usage_error("nanofleet", msg)
}

fn server_options(l: ListenArgs, data_dir: PathBuf) -> server::Options {
    if let Some(url) = &l.database_url
        && !["sqlite:", "postgres:", "postgresql:"].iter().any(|p| url.starts_with(p))
    {
        config_error(format!("--database-url {url:?}: allowed sqlite://PATH or postgres://USER@HOST/DB"));
    }
    let mut o = server::Options::new(data_dir);
    o.database_url = l.database_url;
    o.grpc_listen = l.grpc_listen;
    o.http_listen = l.http_listen;
    o.mqtt.listen = l.mqtt_listen;
    if let Some(addr) = l.mqtt_plaintext_dev {
        if !addr.ip().is_loopback() {
            config_error(format!(
                "--mqtt-plaintext-dev {addr}: allowed only on a loopback address (127.0.0.1, ::1)"
            ));
        }
        o.mqtt.plaintext_listen = Some(addr);
    }
    o.mqtt_advertise = l.mqtt_advertise;
    if !l.server_names.is_empty() {
        o.server_names = nanofleet_pki::ServerNames(l.server_names);
    }
    if l.device_cert_validity < Duration::from_secs(600)
        || l.device_cert_validity > Duration::from_secs(397 * 86_400)
    {
        config_error(format!(
            "--device-cert-validity {}: allowed 10m to 397d",
            humantime::format_duration(l.device_cert_validity)
        ));
    }
    o.device_cert_validity = l.device_cert_validity;
    if let Some(url) = &l.alert_webhook {
        o.alerts.webhook =
            Some(url.parse().unwrap_or_else(|e| config_error(format!("--alert-webhook: {e}"))));
    }
    if l.silent_after < Duration::from_secs(10) || l.silent_after > Duration::from_secs(7 * 86_400) {
        config_error(format!(
            "--silent-after {}: allowed 10s to 7d",
            humantime::format_duration(l.silent_after)
        ));
    }
    o.alerts.silent_after = l.silent_after;
    if l.alert_every < Duration::from_secs(1) || l.alert_every > Duration::from_secs(3_600) {
        config_error(format!(
            "--alert-every {}: allowed 1s to 1h",
            humantime::format_duration(l.alert_every)
        ));
    }
    o.alerts.evaluate_every = l.alert_every;
    let fmt = |d: Duration| humantime::format_duration(d).to_string();
    if l.retain_raw < Duration::from_secs(3_600) || l.retain_raw > Duration::from_secs(100 * 365 * 86_400) {
        config_error(format!("--retain-raw {}: allowed 1h to 100 years", fmt(l.retain_raw)));
    }
    if l.retain_minutes < l.retain_raw || l.retain_minutes > Duration::from_secs(100 * 365 * 86_400) {
        config_error(format!(
            "--retain-minutes {}: allowed from --retain-raw ({}) to 100 years",
            fmt(l.retain_minutes),
            fmt(l.retain_raw)
        ));
    }
    if l.retain_hours < l.retain_minutes || l.retain_hours > Duration::from_secs(100 * 365 * 86_400) {
        config_error(format!(
            "--retain-hours {}: allowed from --retain-minutes ({}) to 100 years",
            fmt(l.retain_hours),
            fmt(l.retain_minutes)
        ));
    }
    o.ingest.retention = nanofleet_store::Retention {
        raw_ms: l.retain_raw.as_millis() as i64,
        minute_ms: l.retain_minutes.as_millis() as i64,
        hour_ms: l.retain_hours.as_millis() as i64,
    };
    o
}

fn main() {
    let cli: Cli = process::parse_args();
    process::run_main("nanofleet", run(cli));
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(a) => {
            process::init_tracing("info,rmqtt=warn,rmqtt_net=warn");
            let Some(dir) = a.listen.data_dir.clone() else {
                config_error("--data-dir (or NANOFLEET_DATA_DIR) is required for `nanofleet server`");
            };
            let server = Server::start(&server_options(a.listen, dir)).await?;
            eprintln!(
                "nanofleet server: dashboard https://{}/  grpc https://{}  mqtt (mutual TLS) {}\n  fleet root {} (sha256 {})",
                server.http_addr,
                server.grpc_addr,
                server.mqtt_addr,
                server.ca.root_path().display(),
                server.ca.root_fingerprint()
            );
            if let Some(addr) = server.mqtt_plaintext_addr {
                eprintln!("  mqtt-plaintext-dev {addr} (development only: no client certificates)");
            }
            process::stop_signal().await;
            server.shutdown().await;
        }
        Command::Demo(a) => {
            process::init_tracing("warn,nanofleet=info");
            if !(0.0..=1.0).contains(&a.fault_rate) {
                config_error(format!("--fault-rate {}: allowed 0 to 1", a.fault_rate));
            }
            if a.sites == 0 || a.devices_per_site == 0 || a.sites * a.devices_per_site > 10_000 {
                config_error("--sites x --devices-per-site: allowed 1 to 10,000 devices");
            }
            if !(1.0..=100_000.0).contains(&a.time_scale) {
                config_error(format!("--time-scale {}: allowed 1 to 100000", a.time_scale));
            }
            let bad_lot = match a.bad_lot.as_str() {
                "none" => None,
                lot => match nanofleet_agent::runs::valid_id("--bad-lot", lot) {
                    Ok(()) => Some(lot.to_owned()),
                    Err(e) => config_error(format!("{e} (or none for no bad lot)")),
                },
            };
            let started = Instant::now();
            let (dir, _temp) = match a.listen.data_dir.clone() {
                Some(d) => (d, None),
                None => {
                    let t = tempfile::Builder::new().prefix("nanofleet-demo-").tempdir()?;
                    (t.path().to_path_buf(), Some(t))
                }
            };
            let opts = demo::Options {
                server: server_options(a.listen, dir.clone()),
                sites: a.sites,
                devices_per_site: a.devices_per_site,
                fault_rate: a.fault_rate,
                time_scale: Some(a.time_scale),
                bad_lot,
                sample_interval: Duration::from_millis(100),
                batch_interval: Duration::from_secs(1),
            };
            let demo = Demo::start(&opts).await?;
            nanofleet::outln!("{}", demo.banner());
            nanofleet::outln!(
                "\n  data       {}\n  ready in   {} ms",
                dir.display(),
                started.elapsed().as_millis()
            );
            process::stop_signal().await;
            eprintln!("stopping: devices say goodbye, then the server");
            demo.stop().await;
        }
        Command::Sites { command: SitesCommand::List { client } } => {
            client.connect().await?.sites_list(&client.server).await?;
        }
        Command::Sites { command: SitesCommand::Create { id, name, time_zone, reason, client } } => {
            let req = pb::CreateSiteRequest { site_id: id, name, time_zone, reason };
            client.connect().await?.sites_create(&client.server, req).await?;
        }
        Command::Sites { command: SitesCommand::SetWindow { site, window, reason, client } } => {
            let req = pb::SetMaintenanceWindowRequest { site_id: site, window, reason };
            client.connect().await?.sites_set_window(&client.server, req).await?;
        }
        Command::Devices { command: DevicesCommand::List { site, client } } => {
            client.connect().await?.devices_list(&client.server, site).await?;
        }
        Command::Devices { command: DevicesCommand::Show { id, client } } => {
            client.connect().await?.devices_show(&client.server, &id).await?;
        }
        Command::Devices { command: DevicesCommand::Tag { id, add, remove, reason, client } } => {
            let req = pb::SetDeviceTagsRequest { device_id: id, add, remove, reason };
            client.connect().await?.devices_tag(&client.server, req).await?;
        }
        Command::Devices { command: DevicesCommand::Decommission { id, reason, client } } => {
            let req = pb::DecommissionDeviceRequest { device_id: id, reason };
            client.connect().await?.devices_decommission(&client.server, req).await?;
        }
        Command::Devices { command: DevicesCommand::Replace { id, reason, expires, client } } => {
            let req = pb::ReplaceDeviceRequest {
                device_id: id,
                reason,
                expires_in_seconds: secs(expires, "--expires"),
            };
            client.connect().await?.devices_replace(&client.server, req).await?;
        }
        Command::Telemetry(a) => {
            let c = a.client.connect().await?;
            match &a.metric {
                None => c.telemetry(&a.client.server, &a.id, a.since, a.limit).await?,
                Some(metric) => {
                    let resolution = nanofleet_api::series::resolution_named(&a.resolution)?;
                    let req = pb::QuerySeriesRequest {
                        device_id: a.id.clone(),
                        metric: metric.clone(),
                        since_unix_ms: now_ms() - a.since.as_millis() as i64,
                        until_unix_ms: 0,
                        resolution: resolution as i32,
                        max_points: a.points,
                    };
                    c.series(&a.client.server, req).await?;
                }
            }
        }
        Command::EnrollToken {
            command: TokenCommand::Create { site, expires, uses, device_id, reason, client },
        } => {
            let req = pb::CreateEnrollTokenRequest {
                site_id: site,
                expires_in_seconds: secs(expires, "--expires"),
                uses,
                device_id: device_id.unwrap_or_default(),
                reason,
            };
            client.connect().await?.token_create(&client.server, req).await?;
        }
        Command::EnrollToken { command: TokenCommand::List { site, client } } => {
            client.connect().await?.token_list(&client.server, site).await?;
        }
        Command::EnrollToken { command: TokenCommand::Revoke { id, reason, client } } => {
            let req = pb::RevokeEnrollTokenRequest { token_id: id, reason };
            client.connect().await?.token_revoke(&client.server, req).await?;
        }
        Command::Ca { command: CaCommand::Show { data_dir, output } } => {
            nanofleet::cli::ca_show(&data_dir, output)?;
        }
        Command::Ca { command: CaCommand::Import { data_dir, cert, key } } => {
            nanofleet::cli::ca_import(&data_dir, &cert, &key)?;
        }
        Command::Ca { command: CaCommand::Rotate { data_dir } } => {
            nanofleet::cli::ca_rotate(&data_dir)?;
        }
        Command::Whoami { client } => client.connect().await?.whoami(&client.server).await?,
        Command::People { command: PeopleCommand::Add { id, name, role, site, reason, client } } => {
            let req = pb::CreatePersonRequest {
                id,
                display_name: name,
                role: role_arg(&role),
                site_id: site,
                reason,
            };
            client.connect().await?.people_add(&client.server, req).await?;
        }
        Command::People { command: PeopleCommand::List { client } } => {
            client.connect().await?.people_list(&client.server).await?;
        }
        Command::People { command: PeopleCommand::Grant { id, role, site, reason, client } } => {
            let req = pb::GrantRoleRequest { person_id: id, role: role_arg(&role), site_id: site, reason };
            client.connect().await?.people_grant(&client.server, req).await?;
        }
        Command::People { command: PeopleCommand::Disable { id, reason, client } } => {
            let req = pb::DisablePersonRequest { person_id: id, reason };
            client.connect().await?.people_disable(&client.server, req).await?;
        }
        Command::ApiToken { command: ApiTokenCommand::Create { person, expires, description, client } } => {
            let req = pb::CreateApiTokenRequest {
                person_id: person,
                expires_in_seconds: secs(expires, "--expires"),
                description,
            };
            client.connect().await?.api_token_create(&client.server, req).await?;
        }
        Command::ApiToken { command: ApiTokenCommand::Revoke { id, reason, client } } => {
            let req = pb::RevokeApiTokenRequest { token_id: id, reason };
            client.connect().await?.api_token_revoke(&client.server, req).await?;
        }
        Command::Audit {
            command: AuditCommand::List { actor, action, subject, site, since, after, limit, client },
        } => {
            let since_unix_ms = since.map(|d| now_ms() - d.as_millis() as i64).unwrap_or(0);
            let req = pb::ListAuditRequest {
                actor: actor.unwrap_or_default(),
                action: action.unwrap_or_default(),
                subject: subject.unwrap_or_default(),
                site_id: site.unwrap_or_default(),
                since_unix_ms,
                until_unix_ms: 0,
                after_seq: after,
                limit,
            };
            client.connect().await?.audit_list(&client.server, req).await?;
        }
        Command::Recipes { command } => recipes(command).await?,
        Command::Firmware { command } => firmware(command).await?,
        Command::Rollouts { command } => rollouts(command).await?,
        Command::Cartridges { command } => cartridges(command).await?,
        Command::Lots { command } => lots(command).await?,
        Command::Shipments { command } => shipments(command).await?,
        Command::Stock { site, client } => client.connect().await?.stock(&client.server, site).await?,
        Command::Runs { command } => runs(command).await?,
        Command::Batches { command } => batches(command).await?,
        Command::Quality { command } => quality(command).await?,
        Command::Alerts { command } => alerts(command).await?,
        Command::Audit { command: AuditCommand::Verify { checkpoint, save_checkpoint, client } } => {
            client
                .connect()
                .await?
                .audit_verify(&client.server, checkpoint.as_deref(), save_checkpoint.as_deref())
                .await?;
        }
    }
    Ok(())
}

async fn rollouts(command: RolloutsCommand) -> anyhow::Result<()> {
    use nanofleet::cli::rollouts::{action_arg, wave_plan};
    match command {
        RolloutsCommand::Create {
            target,
            sites,
            from_versions,
            tags,
            devices,
            canary,
            waves,
            exponential,
            success,
            errors,
            action,
            device_timeout,
            attempts,
            health_watch,
            rollback_on_regression,
            reason,
            client,
        } => {
            let req = pb::CreateRolloutRequest {
                target,
                filter: Some(pb::RolloutFilter {
                    site_ids: sites,
                    from_versions,
                    tags,
                    device_ids: devices,
                    ..Default::default()
                }),
                waves: Some(wave_plan(canary, waves.as_deref(), exponential.as_deref())?),
                success_threshold_pct: success,
                error_threshold_pct: errors,
                action: action_arg(&action)? as i32,
                device_timeout_seconds: device_timeout.as_secs() as i64,
                max_attempts: attempts,
                health_watch_seconds: health_watch.as_secs() as i64,
                rollback_on_regression,
                reason,
            };
            client.connect().await?.rollout_create(&client.server, req).await?;
        }
        RolloutsCommand::Show { rollout_id, client } => {
            client.connect().await?.rollout_show(&client.server, rollout_id).await?
        }
        RolloutsCommand::List { state, client } => {
            client.connect().await?.rollout_list(&client.server, state).await?
        }
        RolloutsCommand::Watch { rollout_id, client } => {
            client.connect().await?.rollout_watch(&client.server, rollout_id).await?
        }
        RolloutsCommand::Pause { rollout_id, reason, client } => {
            steer(client, "pause", rollout_id, reason, String::new()).await?
        }
        RolloutsCommand::Resume { rollout_id, reason, client } => {
            steer(client, "resume", rollout_id, reason, String::new()).await?
        }
        RolloutsCommand::Cancel { rollout_id, reason, client } => {
            steer(client, "cancel", rollout_id, reason, String::new()).await?
        }
        RolloutsCommand::Rollback { rollout_id, to, reason, client } => {
            steer(client, "rollback", rollout_id, reason, to).await?
        }
    }
    Ok(())
}

/// Pause, resume, cancel or roll back a rollout.
async fn steer(client: ClientArgs, what: &str, id: String, reason: String, to: String) -> anyhow::Result<()> {
    client.connect().await?.rollout_control(&client.server, what, id, reason, to).await
}

async fn cartridges(command: CartridgesCommand) -> anyhow::Result<()> {
    use nanofleet::cli::inventory::{read_readings, read_scans};
    match command {
        CartridgesCommand::Types { command: TypesCommand::List { client } } => {
            client.connect().await?.cartridge_types(&client.server).await?;
        }
        CartridgesCommand::Types {
            command:
                TypesCommand::Add {
                    gtin,
                    name,
                    payload,
                    volume_ml,
                    storage_class,
                    excursion_limit_min,
                    models,
                    lead_time_days,
                    client,
                },
        } => {
            let t = pb::CartridgeType {
                gtin,
                name,
                payload,
                volume_ml,
                storage_class,
                excursion_limit_min,
                device_models: models,
                lead_time_days,
                recipe_ids: Vec::new(),
            };
            client.connect().await?.cartridge_type_add(&client.server, t).await?;
        }
        CartridgesCommand::Scan { code, device, recipe, client } => {
            let req = pb::ScanCartridgeRequest {
                scan: nanofleet::cli::inventory::typed_gs(&code),
                device_id: device,
                recipe_id: recipe,
            };
            if !client.connect().await?.cartridge_scan(&client.server, req).await? {
                std::process::exit(3);
            }
        }
        CartridgesCommand::Receive { shipment, site, scans, readings, client } => {
            let req = pb::ReceiveShipmentRequest {
                shipment_id: shipment,
                site_id: site,
                scans: read_scans(&scans)?,
                readings: read_readings(&readings)?,
            };
            client.connect().await?.shipment_receive(&client.server, req).await?;
        }
        CartridgesCommand::Show { gtin, serial, client } => {
            client.connect().await?.cartridge_show(&client.server, gtin, serial).await?;
        }
        CartridgesCommand::Move { gtin, serial, stored, loaded, wasted, client } => {
            let mut req = pb::MoveCartridgeRequest { gtin, serial, ..Default::default() };
            match (stored, loaded, wasted) {
                (Some(location), None, None) => {
                    req.kind = "stored".into();
                    req.location = location;
                }
                (None, Some(device), None) => {
                    req.kind = "loaded".into();
                    req.device_id = device;
                }
                (None, None, Some(reason)) => {
                    req.kind = "wasted".into();
                    req.reason = reason;
                }
                _ => anyhow::bail!("give one of --stored LOCATION, --loaded DEVICE or --wasted REASON"),
            }
            client.connect().await?.cartridge_move(&client.server, req).await?;
        }
    }
    Ok(())
}

async fn lots(command: LotsCommand) -> anyhow::Result<()> {
    use nanofleet::cli::recipes::PasswordSource;
    match command {
        LotsCommand::Create { gtin, lot, produced, expires, quantity, client } => {
            let req = pb::CreateLotRequest { gtin, lot, produced, expires, quantity };
            client.connect().await?.lot_create(&client.server, req).await?;
        }
        LotsCommand::Release { lot, gtin, reason, client } => {
            client
                .connect()
                .await?
                .lot_release(&client.server, pb::ReleaseLotRequest { gtin, lot, reason })
                .await?;
        }
        LotsCommand::List { gtin, status, client } => {
            client.connect().await?.lots(&client.server, pb::ListLotsRequest { gtin, status }).await?;
        }
        LotsCommand::Show { lot, gtin, client } => {
            client.connect().await?.lot_show(&client.server, pb::GetLotRequest { gtin, lot }).await?;
        }
        LotsCommand::Recall { lot, gtin, reason, user, password_stdin, client } => {
            let source = if password_stdin { PasswordSource::Stdin } else { PasswordSource::Prompt };
            client.connect().await?.lot_recall(&client.server, gtin, lot, reason, user, source).await?;
        }
        LotsCommand::DenyList { client } => client.connect().await?.deny_list_status(&client.server).await?,
    }
    Ok(())
}

async fn shipments(command: ShipmentsCommand) -> anyhow::Result<()> {
    match command {
        ShipmentsCommand::Send { lot, gtin, site, count, codes, client } => {
            let req = pb::ShipCartridgesRequest { gtin, lot, site_id: site, count };
            client.connect().await?.shipment_send(&client.server, req, codes.as_deref()).await?;
        }
        ShipmentsCommand::List { site, client } => {
            client.connect().await?.shipments(&client.server, site).await?
        }
    }
    Ok(())
}

async fn firmware(command: FirmwareCommand) -> anyhow::Result<()> {
    use nanofleet::cli::firmware::Upload;
    use nanofleet::cli::recipes::PasswordSource;
    match command {
        FirmwareCommand::Upload {
            file,
            model,
            version,
            release_counter,
            notes,
            user,
            password_stdin,
            client,
        } => {
            let password = if password_stdin { PasswordSource::Stdin } else { PasswordSource::Prompt };
            let upload = Upload { model, version, release_counter, notes, user_id: user, password };
            client.connect().await?.firmware_upload(&client.server, &file, upload).await?;
        }
        FirmwareCommand::List { model, client } => {
            client.connect().await?.firmware_list(&client.server, model).await?;
        }
    }
    Ok(())
}

async fn recipes(command: RecipesCommand) -> anyhow::Result<()> {
    use nanofleet::cli::recipes::{PasswordSource, example_json, meaning_arg, read_recipe};
    match command {
        RecipesCommand::Example { id, site } => nanofleet::outln!("{}", example_json(&id, &site)),
        RecipesCommand::Draft { file, client } => {
            let recipe = read_recipe(&file)?;
            client.connect().await?.recipe_save(&client.server, recipe).await?;
        }
        RecipesCommand::Sign { recipe_id, version, meaning, user, password_stdin, client } => {
            let meaning = meaning_arg(&meaning)?;
            let source = if password_stdin { PasswordSource::Stdin } else { PasswordSource::Prompt };
            client
                .connect()
                .await?
                .recipe_sign(&client.server, recipe_id, version, meaning, user, source)
                .await?;
        }
        RecipesCommand::Reject { recipe_id, version, reason, client } => {
            let req = pb::RejectRecipeRequest { recipe_id, version, reason };
            client.connect().await?.recipe_reject(&client.server, req).await?;
        }
        RecipesCommand::Show { recipe_id, version, client } => {
            client.connect().await?.recipe_show(&client.server, recipe_id, version).await?;
        }
        RecipesCommand::List { id, status, client } => {
            let status = match status.as_deref() {
                None => pb::RecipeStatus::Unspecified,
                Some("draft") => pb::RecipeStatus::Draft,
                Some("authored") => pb::RecipeStatus::Authored,
                Some("released") => pb::RecipeStatus::Released,
                Some("rejected") => pb::RecipeStatus::Rejected,
                Some(other) => {
                    anyhow::bail!("--status {other:?}: allowed: draft, authored, released, rejected")
                }
            };
            let req = pb::ListRecipesRequest { recipe_id: id, status: status as i32 };
            client.connect().await?.recipe_list(&client.server, req).await?;
        }
        RecipesCommand::Deliveries { recipe_id, version, client } => {
            client.connect().await?.recipe_deliveries(&client.server, recipe_id, version).await?;
        }
    }
    Ok(())
}

async fn runs(command: RunsCommand) -> anyhow::Result<()> {
    use nanofleet::cli::batches::{RunArgs, expiry_arg, time_arg};
    let RunsCommand::Start {
        device,
        recipe,
        recipe_version,
        scan,
        gtin,
        lot,
        serial,
        expires,
        prescription,
        prescribed,
        patient,
        client,
    } = command;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let args = RunArgs {
        device_id: device,
        recipe_id: recipe,
        recipe_version,
        cartridge: match (gtin, lot, serial, expires) {
            (Some(gtin), Some(lot), Some(serial), Some(expires)) => {
                Some(nanofleet_proto::device::v1::Cartridge {
                    gtin,
                    lot,
                    serial,
                    expires_unix_ms: expiry_arg(&expires)?,
                })
            }
            _ => None,
        },
        cartridge_scan: scan.as_deref().map(nanofleet::cli::inventory::typed_gs).unwrap_or_default(),
        prescription_id: prescription,
        prescription_unix_ms: time_arg("--prescribed", &prescribed, now)?,
        patient_pseudonym: patient,
    };
    client.connect().await?.run_start(&client.server, args).await
}

async fn batches(command: BatchesCommand) -> anyhow::Result<()> {
    use nanofleet::cli::batches::disposition_arg;
    use nanofleet::cli::recipes::PasswordSource;
    use nanofleet_proto::device::v1::SignatureMeaning;
    let source = |stdin: bool| if stdin { PasswordSource::Stdin } else { PasswordSource::Prompt };
    match command {
        BatchesCommand::List { site, device, recipe, disposition, limit, client } => {
            let req = pb::ListBatchesRequest {
                site_id: site,
                device_id: device,
                recipe_id: recipe,
                disposition: disposition_arg(disposition.as_deref())? as i32,
                limit,
            };
            client.connect().await?.batch_list(&client.server, req).await?;
        }
        BatchesCommand::Show { batch_id, client } => {
            client.connect().await?.batch_show(&client.server, batch_id).await?;
        }
        BatchesCommand::Release { batch_id, reason, user, password_stdin, client } => {
            let c = client.connect().await?;
            c.batch_decide(
                &client.server,
                batch_id,
                SignatureMeaning::Released,
                reason,
                user,
                source(password_stdin),
            )
            .await?;
        }
        BatchesCommand::Reject { batch_id, reason, user, password_stdin, client } => {
            let c = client.connect().await?;
            c.batch_decide(
                &client.server,
                batch_id,
                SignatureMeaning::Rejected,
                reason,
                user,
                source(password_stdin),
            )
            .await?;
        }
        BatchesCommand::Verify { file, devices_ca } => {
            use anyhow::Context as _;
            let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            let bundle = nanofleet_pki::tls::certs_from_file(&devices_ca)
                .map_err(|e| anyhow::anyhow!("--devices-ca {}: {e}", devices_ca.display()))?;
            let c = nanofleet::cli::batches::verify_export(&text, &bundle)
                .with_context(|| format!("{}: the batch record does not verify", file.display()))?;
            nanofleet::outln!(
                "{}: batch {} verifies\n  signed by   device {} (site {}), certificate {}\n  record      SHA-256 {}\n  QA          {}",
                file.display(),
                c.batch_id,
                c.device_id,
                c.site_id,
                c.certificate_serial,
                c.digest,
                c.decision.as_deref().unwrap_or("no decision in this export")
            );
        }
        BatchesCommand::Export { batch_id, format, out, client } => {
            let format = match format.as_str() {
                "html" => pb::ExportFormat::Html,
                "json" => pb::ExportFormat::Json,
                other => anyhow::bail!("--format {other:?}: allowed: html, json"),
            };
            client.connect().await?.batch_export(&client.server, batch_id, format, out.as_deref()).await?;
        }
    }
    Ok(())
}

async fn quality(command: QualityCommand) -> anyhow::Result<()> {
    use nanofleet::cli::monitoring::{factor_arg, selectors};
    match command {
        QualityCommand::Chart { metric, by, select, baseline, points, client } => {
            let by = by.map(|b| factor_arg("--by", &b)).transpose()?.unwrap_or(pb::Factor::Unspecified);
            let req = pb::GetControlChartRequest {
                metric,
                selection: Some(select.selection()),
                by: by as i32,
                baseline_points: baseline,
                max_points: points,
            };
            client.connect().await?.quality_chart(&client.server, req).await?;
        }
        QualityCommand::Compare { metric, by, select, alpha, client } => {
            let req = pb::CompareStrataRequest {
                metric,
                selection: Some(select.selection()),
                by: factor_arg("--by", &by)? as i32,
                alpha,
            };
            client.connect().await?.quality_compare(&client.server, req).await?;
        }
        QualityCommand::Gate { a, b, since, alpha, min_effect, metric, client } => {
            let since = since_ms(since);
            let req = pb::CompareCohortsRequest {
                cohort_a: Some(selectors("--a", &a, since)?),
                cohort_b: Some(selectors("--b", &b, since)?),
                alpha,
                min_effect_sigma: min_effect,
                min_samples: 0,
                metrics: metric,
            };
            if client.connect().await?.quality_gate(&client.server, req).await? {
                std::process::exit(1);
            }
        }
        QualityCommand::Health { since, client } => {
            client.connect().await?.quality_health(&client.server, since_ms(Some(since))).await?;
        }
    }
    Ok(())
}

async fn alerts(command: AlertsCommand) -> anyhow::Result<()> {
    match command {
        AlertsCommand::List { state, site, kind, limit, client } => {
            let states = match state.as_deref() {
                None => vec![],
                Some(s) => nanofleet_api::alert_states_named(s)
                    .ok_or_else(|| {
                        anyhow::anyhow!("--state {s:?}: allowed open, acknowledged, resolved, all")
                    })?
                    .into_iter()
                    .map(|s| s as i32)
                    .collect(),
            };
            let kind = match kind.as_deref() {
                None => pb::AlertKind::Unspecified,
                Some(k) => nanofleet_api::alert_kind_named(k).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--kind {k:?}: allowed spc_rule, device_silent, alarm_storm, site_differs"
                    )
                })?,
            };
            let req = pb::ListAlertsRequest { states, site_id: site, kind: kind as i32, limit };
            client.connect().await?.alerts_list(&client.server, req).await?;
        }
        AlertsCommand::Ack { alert_id, note, client } => {
            client.connect().await?.alerts_ack(&client.server, alert_id, note).await?;
        }
        AlertsCommand::Watch { site, client } => {
            client.connect().await?.alerts_watch(&client.server, site).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
