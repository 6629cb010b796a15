//! `mesh-agent trust ...`: the operator's commands for the offline trust directory.
//!
//! The directory holds the anchor keys, which never leave it; agents only ever receive
//! `bundle.pem` (public) and `issuer.pem` (secret, short-lived). Every file is replaced by an
//! atomic rename of a fully written, fsynced temporary file, so a crash leaves either the old or
//! the new version of each file, never a torn one. Multi-file steps write `state.toml` last and
//! are safe to re-run when interrupted (see each step).
//!
//! The anchor rotation is three steps, each run by `trust rotate` once it is safe:
//! 1. add-anchor: a new anchor joins the bundle (agents trust old and new);
//! 2. switch-issuer: once every agent had `propagation_delay` to load that bundle, a new issuer
//!    signed by the new anchor replaces the old one;
//! 3. drop-old-anchor: once every certificate minted under the old issuer has expired
//!    (`propagation_delay + max_leaf_lifetime + clock_skew` after step 2), the bundle keeps only
//!    the new anchor.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use super::authority::{
    Authority, EXPIRY_WARNING_WINDOW, Issuer, TrustBundle, check_secret_file_mode, renewal_window,
};
use super::certs::{self, CLOCK_SKEW, CertInfo, SigningCa};
use super::spiffe::TrustDomain;

const ANCHOR_PEM: &str = "anchor.pem";
const ANCHOR_KEY: &str = "anchor.key";
const NEXT_PEM: &str = "anchor-next.pem";
const NEXT_KEY: &str = "anchor-next.key";
const BUNDLE: &str = "bundle.pem";
const ISSUER: &str = "issuer.pem";
const STATE: &str = "state.toml";
const MATERIAL: [&str; 7] = [
    ANCHOR_PEM, ANCHOR_KEY, NEXT_PEM, NEXT_KEY, BUNDLE, ISSUER, STATE,
];
const STATE_VERSION: u32 = 1;

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Operator commands for the trust directory (anchor, issuer, rotation). Needs no root.
#[derive(Debug, Args)]
pub struct TrustArgs {
    #[command(subcommand)]
    pub command: TrustCommand,
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Create a trust directory: a trust anchor, bundle.pem and issuer.pem.
    Init(InitArgs),
    /// Perform the next step of the quarterly anchor rotation, once it is safe.
    Rotate(RotateArgs),
    /// Replace issuer.pem with a new issuer from the current anchor (monthly).
    RenewIssuer(DirArgs),
    /// Show anchors, issuer, rotation state and what is due; exits non-zero if anything is
    /// expired or broken.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct DirArgs {
    /// The offline trust directory (holds the anchor keys).
    #[arg(long, env = "MESH_TRUST_DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// SPIFFE trust domain, e.g. `prod.example.com`.
    #[arg(long)]
    pub trust_domain: TrustDomain,
    /// Lifetime of each trust anchor.
    #[arg(long, default_value = "365d", value_parser = parse_duration)]
    pub anchor_validity: Duration,
    /// Lifetime of each issuer (renewed with `trust renew-issuer`).
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub issuer_validity: Duration,
    /// How often the anchor is rotated.
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    pub rotation_period: Duration,
    #[command(flatten)]
    pub timing: TimingArgs,
    /// Replace the material of an existing trust directory.
    #[arg(long)]
    pub force: bool,
}

/// Rotation timing, stored in state.toml; `init` sets it, `rotate` may change it.
#[derive(Debug, Args, Default)]
pub struct TimingArgs {
    /// How long every agent needs to receive a new bundle.pem or issuer.pem [init default: 1h].
    #[arg(long, value_parser = parse_duration)]
    pub propagation_delay: Option<Duration>,
    /// The longest workload certificate lifetime of any agent (`identity.workload_cert_ttl`)
    /// [init default: 24h].
    #[arg(long, value_parser = parse_duration)]
    pub max_leaf_lifetime: Option<Duration>,
    /// How far behind a node's clock may be [init default: 5m].
    #[arg(long, value_parser = parse_duration)]
    pub clock_skew: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    #[command(flatten)]
    pub timing: TimingArgs,
    /// Perform the next step even before it is safe (see the refusal message for what breaks).
    #[arg(long, conflicts_with = "abort")]
    pub force: bool,
    /// Abandon a rotation whose switch-issuer step has not happened yet: the bundle goes back
    /// to the current anchor alone and the new anchor is deleted.
    #[arg(long)]
    pub abort: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The offline trust directory.
    #[arg(long, env = "MESH_TRUST_DIR")]
    pub dir: Option<PathBuf>,
    /// A node's bundle.pem (instead of --dir; with --issuer).
    #[arg(long, requires = "issuer")]
    pub bundle: Option<PathBuf>,
    /// A node's issuer.pem (instead of --dir; with --bundle).
    #[arg(long, requires = "bundle")]
    pub issuer: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `trust` subcommand, printing to stdout.
pub fn run(args: TrustArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    execute(args, &mut stdout.lock())
}

/// [`run`] with the output going to `out` (tests read it).
pub fn execute(args: TrustArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let now = SystemTime::now();
    match args.command {
        TrustCommand::Init(a) => init(a, now, out),
        TrustCommand::Rotate(a) => rotate(a, now, out),
        TrustCommand::RenewIssuer(a) => renew_issuer(&a, now, out),
        TrustCommand::Status(a) => status(a, now, out),
    }
}

// ---------------------------------------------------------------------------------------------
// state.toml

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    /// Layout version, so a future format is recognised instead of misread.
    version: u32,
    trust_domain: String,
    #[serde(with = "humantime_serde")]
    initialized: SystemTime,
    /// When `init` ran or the last rotation finished: the next one is due a rotation period
    /// later.
    #[serde(with = "humantime_serde")]
    last_rotation: SystemTime,
    /// When issuer.pem was last written.
    #[serde(with = "humantime_serde")]
    issuer_issued: SystemTime,
    settings: Settings,
    rotation: Rotation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(with = "compact_duration")]
    anchor_validity: Duration,
    #[serde(with = "compact_duration")]
    issuer_validity: Duration,
    #[serde(with = "compact_duration")]
    rotation_period: Duration,
    #[serde(with = "compact_duration")]
    propagation_delay: Duration,
    #[serde(with = "compact_duration")]
    max_leaf_lifetime: Duration,
    #[serde(with = "compact_duration")]
    clock_skew: Duration,
}

impl Settings {
    fn apply(&mut self, t: &TimingArgs) {
        if let Some(d) = t.propagation_delay {
            self.propagation_delay = d;
        }
        if let Some(d) = t.max_leaf_lifetime {
            self.max_leaf_lifetime = d;
        }
        if let Some(d) = t.clock_skew {
            self.clock_skew = d;
        }
    }

    /// How long a whole rotation takes at the earliest.
    fn rotation_duration(&self) -> Duration {
        2 * self.propagation_delay + self.max_leaf_lifetime + self.clock_skew
    }

    fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            !self.anchor_validity.is_zero(),
            "anchor validity must be positive"
        );
        ensure!(
            !self.issuer_validity.is_zero(),
            "issuer validity must be positive"
        );
        ensure!(
            !self.rotation_period.is_zero(),
            "rotation period must be positive"
        );
        ensure!(
            self.rotation_period + self.rotation_duration() < self.anchor_validity,
            "a rotation period of {} plus the time a rotation takes ({}) must be shorter than \
             the anchor validity ({}), or anchors expire before they are rotated",
            fmt_dur(self.rotation_period),
            fmt_dur(self.rotation_duration()),
            fmt_dur(self.anchor_validity)
        );
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case", deny_unknown_fields)]
enum Rotation {
    /// One anchor; the issuer chains to it.
    Stable,
    /// Step 1 done: the bundle holds anchor.pem and anchor-next.pem.
    AnchorAdded {
        #[serde(with = "humantime_serde")]
        anchor_added: SystemTime,
    },
    /// Step 2 done: issuer.pem chains to anchor-next.pem.
    IssuerSwitched {
        #[serde(with = "humantime_serde")]
        anchor_added: SystemTime,
        #[serde(with = "humantime_serde")]
        issuer_switched: SystemTime,
    },
}

impl Rotation {
    fn phase(&self) -> &'static str {
        match self {
            Rotation::Stable => "stable",
            Rotation::AnchorAdded { .. } => "anchor-added",
            Rotation::IssuerSwitched { .. } => "issuer-switched",
        }
    }
}

/// When the next rotation step becomes safe, and what it is.
struct NextStep {
    name: &'static str,
    number: u8,
    safe_from: Option<SystemTime>,
}

/// Rounded up to a whole second, so the time printed as "safe from" is never before the time
/// the check uses.
fn ceil_to_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => UNIX_EPOCH + Duration::from_secs(d.as_secs() + 1),
        _ => t,
    }
}

fn next_step(state: &State) -> NextStep {
    let s = &state.settings;
    match state.rotation {
        Rotation::Stable => NextStep {
            name: "add-anchor",
            number: 1,
            safe_from: None,
        },
        Rotation::AnchorAdded { anchor_added } => NextStep {
            name: "switch-issuer",
            number: 2,
            safe_from: Some(ceil_to_second(anchor_added + s.propagation_delay)),
        },
        Rotation::IssuerSwitched {
            issuer_switched, ..
        } => NextStep {
            name: "drop-old-anchor",
            number: 3,
            // Agents may mint under the old issuer until they load the new one (propagation),
            // and those certificates live max_leaf_lifetime, plus what slow clocks add.
            safe_from: Some(ceil_to_second(
                issuer_switched + s.propagation_delay + s.max_leaf_lifetime + s.clock_skew,
            )),
        },
    }
}

/// Durations in state.toml as a person would write them ("90d", "1h", "2s").
mod compact_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::fmt_dur(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// A duration in its largest exact unit, which humantime parses back unchanged.
fn fmt_dur(d: Duration) -> String {
    if d.subsec_nanos() != 0 {
        return humantime::format_duration(d).to_string();
    }
    let s = d.as_secs();
    match s {
        0 => "0s".to_string(),
        _ if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        _ if s.is_multiple_of(3_600) => format!("{}h", s / 3_600),
        _ if s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// "in 89 days" / "in 59m 59s" / "now" / "2h 5m ago": precise where it matters (minutes before
/// a step becomes safe), coarse where it does not (months before a rotation).
fn relative(t: SystemTime, now: SystemTime) -> String {
    let (d, future) = match t.duration_since(now) {
        Ok(d) => (d, true),
        Err(e) => (e.duration(), false),
    };
    let s = d.as_secs();
    let text = match s {
        0 if future && !d.is_zero() => return "in under a second".to_string(),
        0 => return "now".to_string(),
        _ if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        _ if s >= 3_600 => format!("{}h {}m", s / 3_600, s % 3_600 / 60),
        _ if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{s}s"),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

// ---------------------------------------------------------------------------------------------
// the directory and its files

struct TrustDir {
    path: PathBuf,
}

impl TrustDir {
    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn exists(&self, name: &str) -> bool {
        self.file(name).exists()
    }

    /// Writes `name` atomically: a temporary file in the same directory (so the rename cannot
    /// cross filesystems) created with `mode` from the start (so a secret is never briefly
    /// readable), fsynced, renamed over the old file, and the directory fsynced so the rename
    /// survives a crash.
    fn write(&self, name: &str, contents: &[u8], mode: u32) -> anyhow::Result<()> {
        let target = self.file(name);
        let tmp = self.file(&format!(
            ".{name}.tmp-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let result = (|| -> anyhow::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            // The umask may have removed bits from `mode`; set exactly what was asked.
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f.write_all(contents)?;
            f.sync_all()?;
            fs::rename(&tmp, &target)?;
            File::open(&self.path)?.sync_all()?;
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.with_context(|| format!("writing {}", target.display()))
    }

    fn remove(&self, name: &str) -> anyhow::Result<()> {
        match fs::remove_file(self.file(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", self.file(name).display())),
        }
    }

    fn read_state(&self) -> anyhow::Result<State> {
        let path = self.file(STATE);
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is {} a trust directory made by `mesh-agent trust init`?)",
                path.display(),
                self.path.display()
            )
        })?;
        let state: State =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            state.version == STATE_VERSION,
            "{} has layout version {}, this mesh-agent understands {STATE_VERSION}",
            path.display(),
            state.version
        );
        Ok(state)
    }

    fn trust_domain(&self, state: &State) -> anyhow::Result<TrustDomain> {
        state
            .trust_domain
            .parse()
            .with_context(|| format!("trust_domain in {}", self.file(STATE).display()))
    }

    fn write_state(&self, state: &State) -> anyhow::Result<()> {
        let text = toml::to_string(state).context("serializing state.toml")?;
        let text = format!(
            "# Written by `mesh-agent trust`; edit only the [settings] durations, and only \
             between steps.\n{text}"
        );
        self.write(STATE, text.as_bytes(), 0o644)
    }

    /// An anchor certificate and its key; the key file must be private to its owner.
    fn load_ca(&self, pem: &str, key: &str) -> anyhow::Result<SigningCa> {
        let key_path = self.file(key);
        check_secret_file_mode(&key_path)?;
        let cert_pem = fs::read(self.file(pem))
            .with_context(|| format!("reading {}", self.file(pem).display()))?;
        let mut certs = certs::parse_certs_pem(&cert_pem)
            .with_context(|| format!("{}", self.file(pem).display()))?;
        ensure!(
            certs.len() == 1,
            "{} holds {} certificates, expected 1",
            self.file(pem).display(),
            certs.len()
        );
        let key_pem = zeroize::Zeroizing::new(
            fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?,
        );
        let mut key_der =
            certs::parse_key_pem(&key_pem).with_context(|| format!("{}", key_path.display()))?;
        let ca = SigningCa::new(certs.remove(0), &key_der).with_context(|| {
            format!(
                "{} and {} do not form a CA (an interrupted step? run the command again)",
                self.file(pem).display(),
                key_path.display()
            )
        });
        zeroize::Zeroize::zeroize(&mut key_der);
        ca
    }

    /// Key first: a crash in between leaves a mismatched pair that `load_ca` reports, and the
    /// step that wrote it is re-run.
    fn write_ca(&self, ca: &SigningCa, pem: &str, key: &str) -> anyhow::Result<()> {
        self.write(key, ca.key_pem().as_bytes(), 0o600)?;
        self.write(pem, ca.cert_pem().as_bytes(), 0o644)
    }

    fn write_bundle(&self, anchors: &[&SigningCa]) -> anyhow::Result<()> {
        let pem: String = anchors.iter().map(|a| a.cert_pem()).collect();
        self.write(BUNDLE, pem.as_bytes(), 0o644)
    }

    fn write_issuer(&self, issuer: &SigningCa) -> anyhow::Result<()> {
        self.write(ISSUER, issuer.cert_and_key_pem().as_bytes(), 0o600)
    }

    /// Loads bundle.pem and issuer.pem exactly as an agent would, so a command never leaves
    /// files behind that agents would refuse.
    fn check_agent_view(&self, now: SystemTime) -> anyhow::Result<Authority> {
        Authority::load(&self.file(BUNDLE), &self.file(ISSUER), now)
            .context("the files agents receive do not load")
    }
}

fn short(info: &CertInfo) -> &str {
    info.short_fingerprint()
}

// ---------------------------------------------------------------------------------------------
// init

fn init(a: InitArgs, now: SystemTime, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut settings = Settings {
        anchor_validity: a.anchor_validity,
        issuer_validity: a.issuer_validity,
        rotation_period: a.rotation_period,
        propagation_delay: Duration::from_secs(3600),
        max_leaf_lifetime: certs::DEFAULT_LEAF_TTL,
        clock_skew: CLOCK_SKEW,
    };
    settings.apply(&a.timing);
    settings.validate()?;
    let dir = TrustDir {
        path: a.dir.dir.clone(),
    };
    if dir.path.exists() {
        let existing: Vec<&str> = MATERIAL.into_iter().filter(|f| dir.exists(f)).collect();
        if !existing.is_empty() && !a.force {
            bail!(
                "{} already holds trust material ({}); refusing to overwrite it. `--force` \
                 replaces it with a new anchor and issuer: agents then reject each other until \
                 every one has the new bundle.pem and issuer.pem",
                dir.path.display(),
                existing.join(", ")
            );
        }
        let mode = fs::metadata(&dir.path)
            .with_context(|| format!("reading {}", dir.path.display()))?
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            writeln!(
                out,
                "warning: {} is accessible to group or others (mode {mode:04o}); keys are 0600, \
                 but `chmod 700` it",
                dir.path.display()
            )?;
        }
    } else {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir.path)
            .with_context(|| format!("creating {}", dir.path.display()))?;
    }

    let td = a.trust_domain;
    let anchor = certs::new_trust_anchor(&td, settings.anchor_validity, now)?;
    let issuer = certs::new_issuer(&anchor, settings.issuer_validity, now)?;
    dir.write_ca(&anchor, ANCHOR_PEM, ANCHOR_KEY)?;
    dir.write_bundle(&[&anchor])?;
    dir.write_issuer(&issuer)?;
    // Leftovers of a rotation in the material being replaced.
    dir.remove(NEXT_KEY)?;
    dir.remove(NEXT_PEM)?;
    let state = State {
        version: STATE_VERSION,
        trust_domain: td.to_string(),
        initialized: now,
        last_rotation: now,
        issuer_issued: now,
        settings,
        rotation: Rotation::Stable,
    };
    dir.write_state(&state)?;
    dir.check_agent_view(now)?;

    let s = &state.settings;
    writeln!(
        out,
        "initialized trust directory {} for trust domain {td}",
        dir.path.display()
    )?;
    writeln!(
        out,
        "  trust anchor {} `{}`, valid until {}",
        short(anchor.info()),
        anchor.info().subject,
        fmt_time(anchor.info().not_after)
    )?;
    writeln!(
        out,
        "  issuer `{}`, valid until {}",
        issuer.info().subject,
        fmt_time(issuer.info().not_after)
    )?;
    writeln!(
        out,
        "Give every agent {} (public) and {} (secret: mode 0600, owned by the agent's user). \
         The anchor key {} never leaves this directory.",
        dir.file(BUNDLE).display(),
        dir.file(ISSUER).display(),
        ANCHOR_KEY
    )?;
    writeln!(
        out,
        "Next: renew the issuer by {} (`mesh-agent trust renew-issuer`); rotate the anchor by {} \
         (`mesh-agent trust rotate`).",
        fmt_time(issuer_renew_by(issuer.info())),
        fmt_time(now + s.rotation_period)
    )?;
    Ok(())
}

/// When the issuer should be replaced: the start of its renewal window (the last third of its
/// lifetime, at most 30 days), which is also when agents start warning.
fn issuer_renew_by(info: &CertInfo) -> SystemTime {
    info.not_after - renewal_window(info, EXPIRY_WARNING_WINDOW)
}

// ---------------------------------------------------------------------------------------------
// rotate

fn rotate(a: RotateArgs, now: SystemTime, out: &mut dyn Write) -> anyhow::Result<()> {
    let dir = TrustDir {
        path: a.dir.dir.clone(),
    };
    let mut state = dir.read_state()?;
    if a.abort {
        return abort_rotation(&dir, state, now, out);
    }
    state.settings.apply(&a.timing);
    state.settings.validate()?;
    let td = dir.trust_domain(&state)?;
    let step = next_step(&state);
    let s = state.settings.clone();
    if let Some(safe_from) = step.safe_from
        && now < safe_from
    {
        let (why, risk) = match step.number {
            2 => (
                format!(
                    "every agent must first have had the propagation delay ({}) to load the \
                         bundle.pem with the new anchor",
                    fmt_dur(s.propagation_delay)
                ),
                "agents that have not loaded the new bundle.pem yet reject certificates from \
                     the new issuer, so connections with them fail until they do",
            ),
            _ => (
                format!(
                    "every certificate minted under the old issuer must first have expired \
                         (propagation delay {} + max leaf lifetime {} + clock skew {} after the \
                         issuer switch)",
                    fmt_dur(s.propagation_delay),
                    fmt_dur(s.max_leaf_lifetime),
                    fmt_dur(s.clock_skew)
                ),
                "workloads still presenting a certificate from the old issuer are rejected by \
                     agents holding the new bundle.pem until they re-mint",
            ),
        };
        if !a.force {
            bail!(
                "not yet safe: step {}/3 ({}) is safe from {} ({}): {why}. Run \
                     `mesh-agent trust rotate` again then, or pass --force to do it now: {risk}.",
                step.number,
                step.name,
                fmt_time(safe_from),
                relative(safe_from, now)
            );
        }
        writeln!(
            out,
            "warning: --force: step {}/3 ({}) would only be safe from {} ({}); {risk}.",
            step.number,
            step.name,
            fmt_time(safe_from),
            relative(safe_from, now)
        )?;
    }

    match state.rotation {
        Rotation::Stable => {
            // Re-running after a crash simply makes another new anchor: nothing trusted it yet
            // beyond a bundle that is rewritten here.
            let current = dir.load_ca(ANCHOR_PEM, ANCHOR_KEY)?;
            let next = certs::new_trust_anchor(&td, s.anchor_validity, now)?;
            dir.write_ca(&next, NEXT_PEM, NEXT_KEY)?;
            dir.write_bundle(&[&current, &next])?;
            state.rotation = Rotation::AnchorAdded { anchor_added: now };
            dir.write_state(&state)?;
            dir.check_agent_view(now)?;
            let safe = next_step(&state).safe_from.unwrap_or(now);
            writeln!(
                out,
                "step 1/3 add-anchor: done. New trust anchor {} `{}` (valid until {}); \
                 bundle.pem now holds the current anchor {} and the new one.",
                short(next.info()),
                next.info().subject,
                fmt_time(next.info().not_after),
                short(current.info())
            )?;
            writeln!(
                out,
                "Distribute {} to every agent (issuer.pem is unchanged).",
                dir.file(BUNDLE).display()
            )?;
            writeln!(
                out,
                "Next: step 2/3 switch-issuer (`mesh-agent trust rotate`), safe from {} ({}).",
                fmt_time(safe),
                relative(safe, now)
            )?;
        }
        Rotation::AnchorAdded { anchor_added } => {
            let current = dir.load_ca(ANCHOR_PEM, ANCHOR_KEY)?;
            let next = dir.load_ca(NEXT_PEM, NEXT_KEY)?;
            expect_bundle(&dir, &[current.info(), next.info()], &state)?;
            // Re-running after a crash makes another issuer; agents take whichever arrives.
            let issuer = certs::new_issuer(&next, s.issuer_validity, now)?;
            dir.write_issuer(&issuer)?;
            state.rotation = Rotation::IssuerSwitched {
                anchor_added,
                issuer_switched: now,
            };
            state.issuer_issued = now;
            dir.write_state(&state)?;
            dir.check_agent_view(now)?;
            let safe = next_step(&state).safe_from.unwrap_or(now);
            writeln!(
                out,
                "step 2/3 switch-issuer: done. New issuer `{}` (valid until {}) is signed by the \
                 new anchor {}.",
                issuer.info().subject,
                fmt_time(issuer.info().not_after),
                short(next.info())
            )?;
            writeln!(
                out,
                "Distribute {} (secret, mode 0600) to every agent; each re-mints its workload \
                 certificates when it loads it.",
                dir.file(ISSUER).display()
            )?;
            writeln!(
                out,
                "Next: step 3/3 drop-old-anchor (`mesh-agent trust rotate`), safe from {} ({}).",
                fmt_time(safe),
                relative(safe, now)
            )?;
        }
        Rotation::IssuerSwitched { .. } => {
            let old = dir.load_ca(ANCHOR_PEM, ANCHOR_KEY).ok();
            let next = dir.load_ca(NEXT_PEM, NEXT_KEY)?;
            // Idempotent: a re-run after a crash writes the same files again, since
            // anchor-next.* is only removed after the state says the rotation is over.
            dir.write_bundle(&[&next])?;
            dir.write_ca(&next, ANCHOR_PEM, ANCHOR_KEY)?;
            state.rotation = Rotation::Stable;
            state.last_rotation = now;
            dir.write_state(&state)?;
            dir.remove(NEXT_KEY)?;
            dir.remove(NEXT_PEM)?;
            dir.check_agent_view(now)?;
            writeln!(
                out,
                "step 3/3 drop-old-anchor: done. bundle.pem holds only the new anchor {}{}; its \
                 key is now {}.",
                short(next.info()),
                match &old {
                    Some(o) if o.info() != next.info() =>
                        format!(" (the old anchor {} is gone)", short(o.info())),
                    _ => String::new(),
                },
                ANCHOR_KEY
            )?;
            writeln!(
                out,
                "Distribute {} to every agent. Destroy any backup of the old anchor key.",
                dir.file(BUNDLE).display()
            )?;
            writeln!(
                out,
                "Rotation complete. Next rotation due {} ({}).",
                fmt_time(now + s.rotation_period),
                relative(now + s.rotation_period, now)
            )?;
        }
    }
    Ok(())
}

/// Undoes step 1. Only before step 2: once the issuer chains to the new anchor, going back
/// would strand every certificate minted since, so the way out is forward.
fn abort_rotation(
    dir: &TrustDir,
    mut state: State,
    now: SystemTime,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match state.rotation {
        Rotation::AnchorAdded { .. } => {}
        Rotation::Stable => bail!("no rotation is in progress; nothing to abort"),
        Rotation::IssuerSwitched { .. } => bail!(
            "the issuer already chains to the new anchor (switch-issuer is done); a rotation can              only be aborted before that step. Finish it with `mesh-agent trust rotate`."
        ),
    }
    let current = dir.load_ca(ANCHOR_PEM, ANCHOR_KEY)?;
    dir.write_bundle(&[&current])?;
    state.rotation = Rotation::Stable;
    dir.write_state(&state)?;
    dir.remove(NEXT_KEY)?;
    dir.remove(NEXT_PEM)?;
    dir.check_agent_view(now)?;
    writeln!(
        out,
        "rotation aborted: bundle.pem holds only the current anchor {} again and the new anchor          is deleted. Distribute {} to every agent.",
        short(current.info()),
        dir.file(BUNDLE).display()
    )?;
    Ok(())
}

/// Refuses to continue a rotation when bundle.pem is not what the previous step wrote (someone
/// edited it): carrying on would distribute a bundle the rotation did not plan.
fn expect_bundle(dir: &TrustDir, expected: &[&CertInfo], state: &State) -> anyhow::Result<()> {
    let bundle = TrustBundle::load(&dir.file(BUNDLE))?;
    let found: Vec<&str> = bundle.anchors().iter().map(|a| short(&a.info)).collect();
    let want: Vec<&str> = expected.iter().map(|i| short(i)).collect();
    ensure!(
        found == want,
        "{} holds anchors {found:?}, but in rotation phase `{}` it should hold {want:?}; \
         restore it before continuing",
        dir.file(BUNDLE).display(),
        state.rotation.phase()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// renew-issuer

fn renew_issuer(d: &DirArgs, now: SystemTime, out: &mut dyn Write) -> anyhow::Result<()> {
    let dir = TrustDir {
        path: d.dir.clone(),
    };
    let mut state = dir.read_state()?;
    if state.rotation != Rotation::Stable {
        let step = next_step(&state);
        bail!(
            "an anchor rotation is in progress (phase `{}`, next step {}/3 {}); the issuer \
             changes with its switch-issuer step. Finish the rotation with `mesh-agent trust \
             rotate`, then renew the issuer.",
            state.rotation.phase(),
            step.number,
            step.name
        );
    }
    let anchor = dir.load_ca(ANCHOR_PEM, ANCHOR_KEY)?;
    let issuer = certs::new_issuer(&anchor, state.settings.issuer_validity, now)?;
    dir.write_issuer(&issuer)?;
    state.issuer_issued = now;
    dir.write_state(&state)?;
    dir.check_agent_view(now)?;
    writeln!(
        out,
        "issuer renewed: `{}`, valid until {}, signed by anchor {}.",
        issuer.info().subject,
        fmt_time(issuer.info().not_after),
        short(anchor.info())
    )?;
    // Cut short means the anchor's expiry capped the issuer (certificate times have whole
    // seconds, so compare with the anchor rather than with `now + validity`).
    if issuer.info().not_after >= anchor.info().not_after {
        writeln!(
            out,
            "warning: the issuer is cut short by the anchor, which expires at {}: rotate the \
             anchor (`mesh-agent trust rotate`).",
            fmt_time(anchor.info().not_after)
        )?;
    }
    writeln!(
        out,
        "Distribute {} (secret, mode 0600) to every agent; each re-mints its workload \
         certificates when it loads it. Renew again by {}.",
        dir.file(ISSUER).display(),
        fmt_time(issuer_renew_by(issuer.info()))
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// status

/// A minimal JSON value: enough for `status --json` without another dependency.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    fn str(s: impl Into<String>) -> Json {
        Json::Str(s.into())
    }

    fn time(t: SystemTime) -> Json {
        Json::str(fmt_time(t))
    }

    fn opt_time(t: Option<SystemTime>) -> Json {
        t.map_or(Json::Null, Json::time)
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        '\t' => out.push_str("\\t"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    Json::str(*k).write(out);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

struct AnchorReport {
    info: CertInfo,
    role: &'static str,
    signs_issuer: bool,
}

struct IssuerReport {
    info: CertInfo,
    anchor: Option<String>,
}

struct RotationReport {
    phase: &'static str,
    next_step: NextStep,
    last_rotation: SystemTime,
    rotation_due: SystemTime,
    settings: Settings,
}

/// Everything `status` knows; rendered as text or JSON.
struct Report {
    trust_domain: Option<String>,
    bundle_path: PathBuf,
    issuer_path: PathBuf,
    anchors: Vec<AnchorReport>,
    issuer: Option<IssuerReport>,
    rotation: Option<RotationReport>,
    /// Things to act on soon.
    warnings: Vec<String>,
    /// Things that are wrong now (expired, unreadable, inconsistent): exit status 1.
    problems: Vec<String>,
}

fn status(a: StatusArgs, now: SystemTime, out: &mut dyn Write) -> anyhow::Result<()> {
    let report = match (&a.bundle, &a.issuer, &a.dir) {
        (Some(bundle), Some(issuer), _) => node_report(bundle, issuer, now),
        (None, None, Some(dir)) => dir_report(&TrustDir { path: dir.clone() }, now),
        _ => bail!("give --dir (or MESH_TRUST_DIR), or --bundle and --issuer"),
    };
    if a.json {
        let mut text = String::new();
        report_json(&report, now).write(&mut text);
        writeln!(out, "{text}")?;
    } else {
        write_text(&report, now, out)?;
    }
    match report.problems.len() {
        0 => Ok(()),
        n => Err(anyhow!(
            "{n} problem{} found (see above)",
            if n == 1 { "" } else { "s" }
        )),
    }
}

/// What an agent node holds: bundle.pem and issuer.pem, checked as the agent checks them.
fn node_report(bundle_path: &Path, issuer_path: &Path, now: SystemTime) -> Report {
    let mut report = Report {
        trust_domain: None,
        bundle_path: bundle_path.to_path_buf(),
        issuer_path: issuer_path.to_path_buf(),
        anchors: Vec::new(),
        issuer: None,
        rotation: None,
        warnings: Vec::new(),
        problems: Vec::new(),
    };
    let bundle = match TrustBundle::load(bundle_path) {
        Ok(b) => b,
        Err(e) => {
            report.problems.push(format!("{e:#}"));
            return report;
        }
    };
    report.trust_domain = Some(bundle.trust_domain().to_string());
    let issuer = match Issuer::load(issuer_path, &bundle) {
        Ok(i) => Some(i),
        Err(e) => {
            report.problems.push(format!("{e:#}"));
            // Still describe the issuer certificate if it parses, so the operator sees which.
            report.issuer =
                describe_first_cert(issuer_path).map(|info| IssuerReport { info, anchor: None });
            None
        }
    };
    let issuer_anchor = issuer.as_ref().map(|i| i.anchor_fingerprint().to_string());
    let count = bundle.anchors().len();
    for (n, anchor) in bundle.anchors().iter().enumerate() {
        // `trust rotate` appends the new anchor, so file order tells old from new on a node
        // (the trust directory knows for sure and relabels).
        let role = match (count, n + 1 == count) {
            (1, _) => "current",
            (_, true) => "new",
            (_, false) => "old",
        };
        report.anchors.push(AnchorReport {
            signs_issuer: issuer_anchor.as_deref() == Some(anchor.info.sha256_fingerprint.as_str()),
            info: anchor.info.clone(),
            role,
        });
        if anchor.info.not_after < now {
            let msg = format!(
                "trust anchor {} `{}` expired at {}",
                short(&anchor.info),
                anchor.info.subject,
                fmt_time(anchor.info.not_after)
            );
            report.problems.push(msg);
        }
    }
    if let Some(issuer) = issuer {
        report.issuer = Some(IssuerReport {
            info: issuer.info().clone(),
            anchor: Some(issuer.anchor_fingerprint().to_string()),
        });
        match Authority::new(bundle, issuer, now) {
            Ok(authority) => report
                .warnings
                .extend(authority.expiry_warnings(now, EXPIRY_WARNING_WINDOW)),
            Err(e) => report.problems.push(format!("{e:#}")),
        }
    }
    report.problems.dedup();
    report
}

/// The first certificate of a PEM file, if there is a readable one. Only the certificate is
/// decoded; the key that follows it in issuer.pem is left alone.
fn describe_first_cert(path: &Path) -> Option<CertInfo> {
    use rustls_pki_types::pem::PemObject;
    let pem = fs::read(path).ok()?;
    let cert = rustls_pki_types::CertificateDer::from_pem_slice(&pem).ok()?;
    certs::inspect(&cert).ok()
}

/// The trust directory: the node view of its bundle.pem and issuer.pem, plus the anchor keys,
/// the rotation state and the schedule.
fn dir_report(dir: &TrustDir, now: SystemTime) -> Report {
    let mut report = node_report(&dir.file(BUNDLE), &dir.file(ISSUER), now);
    let state = match dir.read_state() {
        Ok(s) => s,
        Err(e) => {
            report.problems.push(format!("{e:#}"));
            return report;
        }
    };
    if report.trust_domain.as_deref() != Some(state.trust_domain.as_str()) {
        if let Some(td) = &report.trust_domain {
            report.problems.push(format!(
                "bundle.pem is for trust domain `{td}` but state.toml says `{}`",
                state.trust_domain
            ));
        }
        report.trust_domain = Some(state.trust_domain.clone());
    }
    // (role, certificate) of each anchor whose certificate and key load.
    let mut expected: Vec<(&'static str, CertInfo)> = Vec::new();
    let mut check_key = |pem: &str, key: &str, role: &'static str, report: &mut Report| match dir
        .load_ca(pem, key)
    {
        Ok(ca) => expected.push((role, ca.info().clone())),
        Err(e) => report.problems.push(format!("{e:#}")),
    };
    let current_role = match state.rotation {
        Rotation::Stable => "current",
        _ => "old",
    };
    check_key(ANCHOR_PEM, ANCHOR_KEY, current_role, &mut report);
    if state.rotation == Rotation::Stable {
        if dir.exists(NEXT_PEM) || dir.exists(NEXT_KEY) {
            report.warnings.push(format!(
                "{NEXT_PEM}/{NEXT_KEY} are left over from an interrupted rotation; the next \
                 `mesh-agent trust rotate` replaces them"
            ));
        }
    } else {
        check_key(NEXT_PEM, NEXT_KEY, "new", &mut report);
    }
    // The bundle must be what the rotation phase says. Only compare when every key loaded,
    // otherwise the problem is already reported.
    let want_len = if state.rotation == Rotation::Stable {
        1
    } else {
        2
    };
    if expected.len() == want_len {
        let found: Vec<&str> = report.anchors.iter().map(|a| short(&a.info)).collect();
        let want: Vec<&str> = expected.iter().map(|(_, info)| short(info)).collect();
        if !report.anchors.is_empty() && found != want {
            report.problems.push(format!(
                "bundle.pem holds anchors {found:?} but rotation phase `{}` expects {want:?}",
                state.rotation.phase()
            ));
        }
    }
    for a in &mut report.anchors {
        a.role = expected
            .iter()
            .find(|(_, info)| info.sha256_fingerprint == a.info.sha256_fingerprint)
            .map_or("unknown", |(role, _)| role);
    }
    let next = next_step(&state);
    let rotation_due = state.last_rotation + state.settings.rotation_period;
    if state.rotation == Rotation::Stable && rotation_due <= now {
        report.warnings.push(format!(
            "the quarterly anchor rotation was due at {} ({}): start it with `mesh-agent trust \
             rotate`",
            fmt_time(rotation_due),
            relative(rotation_due, now)
        ));
    }
    report.rotation = Some(RotationReport {
        phase: state.rotation.phase(),
        next_step: next,
        last_rotation: state.last_rotation,
        rotation_due,
        settings: state.settings.clone(),
    });
    report
}

fn days_left(info: &CertInfo, now: SystemTime) -> String {
    let days = info.days_left(now);
    if info.not_after < now {
        "EXPIRED".to_string()
    } else if days == 1 {
        "1 day left".to_string()
    } else {
        format!("{days} days left")
    }
}

fn write_text(r: &Report, now: SystemTime, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "trust domain: {}",
        r.trust_domain.as_deref().unwrap_or("(unknown)")
    )?;
    writeln!(out, "anchors ({}):", r.bundle_path.display())?;
    for a in &r.anchors {
        writeln!(
            out,
            "  [{}] {}  {}  notAfter {} ({}){}",
            a.role,
            a.info.sha256_fingerprint,
            a.info.subject,
            fmt_time(a.info.not_after),
            days_left(&a.info, now),
            if a.signs_issuer {
                "  signs the issuer"
            } else {
                ""
            }
        )?;
    }
    match &r.issuer {
        Some(i) => {
            writeln!(out, "issuer ({}):", r.issuer_path.display())?;
            writeln!(
                out,
                "  {}  notAfter {} ({}); chains to anchor {}; renew by {}",
                i.info.subject,
                fmt_time(i.info.not_after),
                days_left(&i.info, now),
                i.anchor
                    .as_deref()
                    .map_or("(none in the bundle)", |f| &f[..16]),
                fmt_time(issuer_renew_by(&i.info))
            )?;
        }
        None => writeln!(out, "issuer ({}): (unreadable)", r.issuer_path.display())?,
    }
    if let Some(rot) = &r.rotation {
        let s = &rot.settings;
        match rot.next_step.safe_from {
            None => writeln!(
                out,
                "rotation: stable; last rotation {}; next quarterly rotation due {} ({}): \
                 `mesh-agent trust rotate`",
                fmt_time(rot.last_rotation),
                fmt_time(rot.rotation_due),
                relative(rot.rotation_due, now)
            )?,
            Some(safe) => writeln!(
                out,
                "rotation: in progress, phase {}; next step {}/3 {}, safe from {} ({}): \
                 `mesh-agent trust rotate`",
                rot.phase,
                rot.next_step.number,
                rot.next_step.name,
                fmt_time(safe),
                relative(safe, now)
            )?,
        }
        writeln!(
            out,
            "settings: anchor validity {}, issuer validity {}, rotation period {}, propagation \
             delay {}, max leaf lifetime {}, clock skew {}",
            fmt_dur(s.anchor_validity),
            fmt_dur(s.issuer_validity),
            fmt_dur(s.rotation_period),
            fmt_dur(s.propagation_delay),
            fmt_dur(s.max_leaf_lifetime),
            fmt_dur(s.clock_skew)
        )?;
    }
    for w in &r.warnings {
        writeln!(out, "WARNING: {w}")?;
    }
    for p in &r.problems {
        writeln!(out, "PROBLEM: {p}")?;
    }
    Ok(())
}

fn cert_json(info: &CertInfo, now: SystemTime, extra: Vec<(&'static str, Json)>) -> Json {
    let mut fields = vec![
        ("fingerprint", Json::str(&info.sha256_fingerprint)),
        ("id", Json::str(short(info))),
        ("subject", Json::str(&info.subject)),
        ("not_before", Json::time(info.not_before)),
        ("not_after", Json::time(info.not_after)),
        ("not_after_unix", Json::Int(unix(info.not_after))),
        ("days_left", Json::Int(info.days_left(now))),
        ("expired", Json::Bool(info.not_after < now)),
    ];
    fields.extend(extra);
    Json::Obj(fields)
}

fn report_json(r: &Report, now: SystemTime) -> Json {
    let anchors = r
        .anchors
        .iter()
        .map(|a| {
            cert_json(
                &a.info,
                now,
                vec![
                    ("role", Json::str(a.role)),
                    ("signs_issuer", Json::Bool(a.signs_issuer)),
                ],
            )
        })
        .collect();
    let issuer = r.issuer.as_ref().map_or(Json::Null, |i| {
        cert_json(
            &i.info,
            now,
            vec![
                ("anchor", i.anchor.clone().map_or(Json::Null, Json::Str)),
                ("renew_by", Json::time(issuer_renew_by(&i.info))),
            ],
        )
    });
    let rotation = r.rotation.as_ref().map_or(Json::Null, |rot| {
        let s = &rot.settings;
        Json::Obj(vec![
            ("phase", Json::str(rot.phase)),
            ("next_step", Json::str(rot.next_step.name)),
            ("next_step_number", Json::Int(rot.next_step.number.into())),
            (
                "next_step_safe_from",
                Json::opt_time(rot.next_step.safe_from),
            ),
            ("last_rotation", Json::time(rot.last_rotation)),
            ("rotation_due", Json::time(rot.rotation_due)),
            (
                "settings",
                Json::Obj(vec![
                    ("anchor_validity", Json::str(fmt_dur(s.anchor_validity))),
                    ("issuer_validity", Json::str(fmt_dur(s.issuer_validity))),
                    ("rotation_period", Json::str(fmt_dur(s.rotation_period))),
                    ("propagation_delay", Json::str(fmt_dur(s.propagation_delay))),
                    ("max_leaf_lifetime", Json::str(fmt_dur(s.max_leaf_lifetime))),
                    ("clock_skew", Json::str(fmt_dur(s.clock_skew))),
                ]),
            ),
        ])
    });
    let strings = |v: &[String]| Json::Arr(v.iter().map(Json::str).collect());
    Json::Obj(vec![
        (
            "trust_domain",
            r.trust_domain.clone().map_or(Json::Null, Json::Str),
        ),
        ("bundle", Json::str(r.bundle_path.display().to_string())),
        ("anchors", Json::Arr(anchors)),
        (
            "issuer_file",
            Json::str(r.issuer_path.display().to_string()),
        ),
        ("issuer", issuer),
        ("rotation", rotation),
        ("warnings", strings(&r.warnings)),
        ("problems", strings(&r.problems)),
        ("ok", Json::Bool(r.problems.is_empty())),
    ])
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use clap::Parser;
    use rustls_pki_types::CertificateDer;

    use super::*;
    use crate::identity::authority::PeerRole;
    use crate::identity::authority::tests::TempDir;
    use crate::identity::spiffe::SpiffeId;

    #[derive(Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: TestCommand,
    }

    #[derive(clap::Subcommand)]
    enum TestCommand {
        Trust(TrustArgs),
    }

    /// Runs `mesh-agent trust ARGS` in-process through the real argument parser.
    fn trust(args: &[&str]) -> (anyhow::Result<()>, String) {
        let argv = ["mesh-agent", "trust"].iter().chain(args);
        let TestCommand::Trust(parsed) = TestCli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command;
        let mut out = Vec::new();
        let result = execute(parsed, &mut out);
        (result, String::from_utf8(out).unwrap())
    }

    fn trust_ok(args: &[&str]) -> String {
        let (result, out) = trust(args);
        if let Err(e) = result {
            panic!("trust {args:?} failed: {e:#}\n{out}");
        }
        out
    }

    fn trust_err(args: &[&str]) -> String {
        let (result, out) = trust(args);
        match result {
            Ok(()) => panic!("trust {args:?} should fail\n{out}"),
            Err(e) => format!("{out}{e:#}"),
        }
    }

    /// `trust rotate` until the step is done, retrying while it is "not yet safe": the real wait.
    fn rotate_when_safe(dir: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (result, out) = trust(&["rotate", "--dir", dir]);
            match result {
                Ok(()) => return out,
                Err(e) if e.to_string().contains("not yet safe") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("rotate failed: {e:#}\n{out}"),
            }
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o777
    }

    fn bundle_ids(dir: &Path) -> Vec<String> {
        TrustBundle::load(&dir.join(BUNDLE))
            .unwrap()
            .anchors()
            .iter()
            .map(|a| a.info.sha256_fingerprint.clone())
            .collect()
    }

    /// Of the first certificate in a PEM file (issuer.pem has a key after it).
    fn fingerprint(path: &Path) -> String {
        use rustls_pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_slice(&fs::read(path).unwrap()).unwrap();
        certs::inspect(&cert).unwrap().sha256_fingerprint
    }

    fn load(dir: &Path) -> Authority {
        Authority::load(&dir.join(BUNDLE), &dir.join(ISSUER), SystemTime::now()).unwrap()
    }

    fn workload() -> SpiffeId {
        "spiffe://example.org/aws/111122223333/role/orders"
            .parse()
            .unwrap()
    }

    /// Verifies a chain against the bundle file at `at` (a time inside the leaf's validity, so
    /// only the bundle's content decides).
    fn verifies(dir: &Path, chain: &[CertificateDer<'static>], at: SystemTime) -> bool {
        let bundle = TrustBundle::load(&dir.join(BUNDLE)).unwrap();
        bundle.verify_peer(chain, PeerRole::Client, at).is_ok()
            && bundle.verify_peer(chain, PeerRole::Server, at).is_ok()
    }

    #[test]
    fn init_writes_private_files_and_status_reads_them() {
        let tmp = TempDir::new("init");
        let dir = tmp.0.join("trust");
        let d = dir.to_str().unwrap();
        let out = trust_ok(&["init", "--dir", d, "--trust-domain", "example.org"]);
        assert!(out.contains("initialized trust directory"), "{out}");
        assert!(
            out.contains("renew-issuer") && out.contains("trust rotate"),
            "{out}"
        );
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(ANCHOR_KEY)), 0o600);
        assert_eq!(mode(&dir.join(ISSUER)), 0o600);
        assert_eq!(mode(&dir.join(BUNDLE)), 0o644);
        assert!(!dir.join(NEXT_PEM).exists());
        // No temporary files are left behind.
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

        let anchor = fingerprint(&dir.join(ANCHOR_PEM));
        assert_eq!(bundle_ids(&dir), vec![anchor.clone()]);
        let auth = load(&dir);
        assert_eq!(auth.issuer_anchor_fingerprint(), anchor);
        assert_eq!(auth.trust_domain().as_str(), "example.org");

        let text = trust_ok(&["status", "--dir", d]);
        assert!(text.contains("trust domain: example.org"), "{text}");
        assert!(text.contains(&format!("[current] {anchor}")), "{text}");
        assert!(text.contains("rotation: stable"), "{text}");
        assert!(!text.contains("PROBLEM"), "{text}");
        let json = trust_ok(&["status", "--dir", d, "--json"]);
        assert!(
            json.contains(&format!("\"fingerprint\":\"{anchor}\"")),
            "{json}"
        );
        assert!(
            json.contains("\"phase\":\"stable\"") && json.contains("\"ok\":true"),
            "{json}"
        );

        // The node view of the same files, without the directory.
        let bundle = dir.join(BUNDLE);
        let issuer = dir.join(ISSUER);
        let text = trust_ok(&[
            "status",
            "--bundle",
            bundle.to_str().unwrap(),
            "--issuer",
            issuer.to_str().unwrap(),
        ]);
        assert!(
            text.contains(&anchor) && !text.contains("rotation:"),
            "{text}"
        );

        // Existing material is not overwritten without --force.
        let err = trust_err(&["init", "--dir", d, "--trust-domain", "example.org"]);
        assert!(
            err.contains("refusing to overwrite") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(fingerprint(&dir.join(ANCHOR_PEM)), anchor);
        trust_ok(&[
            "init",
            "--dir",
            d,
            "--trust-domain",
            "example.org",
            "--force",
        ]);
        assert_ne!(fingerprint(&dir.join(ANCHOR_PEM)), anchor);
    }

    #[test]
    fn full_rotation_keeps_every_leaf_verifiable() {
        let tmp = TempDir::new("rotation");
        let dir = tmp.0.join("trust");
        let d = dir.to_str().unwrap();
        trust_ok(&[
            "init",
            "--dir",
            d,
            "--trust-domain",
            "example.org",
            "--propagation-delay",
            "0s",
            "--max-leaf-lifetime",
            "2s",
            "--clock-skew",
            "0s",
        ]);
        let ttl = Duration::from_secs(2);
        let old = fingerprint(&dir.join(ANCHOR_PEM));
        let t0 = SystemTime::now();
        let leaf0 = load(&dir).mint(&workload(), ttl, t0).unwrap();
        assert!(verifies(&dir, &leaf0.chain, t0));

        // 1. add-anchor: both anchors trusted, the issuer still chains to the old one.
        let out = rotate_when_safe(d, Duration::from_secs(5));
        assert!(out.contains("step 1/3 add-anchor: done"), "{out}");
        let new = fingerprint(&dir.join(NEXT_PEM));
        assert_eq!(bundle_ids(&dir), vec![old.clone(), new.clone()]);
        let auth1 = load(&dir);
        assert_eq!(auth1.issuer_anchor_fingerprint(), old);
        let t1 = SystemTime::now();
        let leaf1 = auth1.mint(&workload(), ttl, t1).unwrap();
        assert!(verifies(&dir, &leaf0.chain, t0) && verifies(&dir, &leaf1.chain, t1));
        let status = trust_ok(&["status", "--dir", d]);
        assert!(status.contains(&format!("[old] {old}")), "{status}");
        assert!(status.contains(&format!("[new] {new}")), "{status}");
        assert!(status.contains("next step 2/3 switch-issuer"), "{status}");

        // 2. switch-issuer: new leaves chain to the new anchor; old leaves still verify.
        let out = rotate_when_safe(d, Duration::from_secs(5));
        assert!(out.contains("step 2/3 switch-issuer: done"), "{out}");
        assert_eq!(bundle_ids(&dir), vec![old.clone(), new.clone()]);
        let auth2 = load(&dir);
        assert_eq!(auth2.issuer_anchor_fingerprint(), new);
        let t2 = SystemTime::now();
        let leaf2 = auth2.mint(&workload(), ttl, t2).unwrap();
        assert!(verifies(&dir, &leaf2.chain, t2));
        assert!(
            verifies(&dir, &leaf1.chain, t1),
            "overlap: old leaves must still verify"
        );

        // 3. drop-old-anchor is refused until the old issuer's leaves have expired...
        let err = trust_err(&["rotate", "--dir", d]);
        assert!(
            err.contains("not yet safe") && err.contains("drop-old-anchor"),
            "{err}"
        );
        assert!(
            err.contains("safe from") && err.contains("--force"),
            "{err}"
        );
        assert!(err.contains("max leaf lifetime 2s"), "{err}");
        assert_eq!(bundle_ids(&dir).len(), 2);

        // ...and is safe to re-run when interrupted: simulate a crash after the new anchor key
        // was copied over anchor.key but before anchor.pem.
        fs::copy(dir.join(NEXT_KEY), dir.join(ANCHOR_KEY)).unwrap();
        let broken = trust_err(&["status", "--dir", d]);
        assert!(
            broken.contains("PROBLEM") && broken.contains("interrupted step"),
            "{broken}"
        );

        let out = rotate_when_safe(d, Duration::from_secs(10));
        assert!(out.contains("step 3/3 drop-old-anchor: done"), "{out}");
        assert!(out.contains("Rotation complete"), "{out}");
        assert!(
            SystemTime::now() >= t2 + ttl,
            "step 3 ran before old leaves expired"
        );
        assert_eq!(bundle_ids(&dir), vec![new.clone()]);
        assert_eq!(fingerprint(&dir.join(ANCHOR_PEM)), new);
        assert!(!dir.join(NEXT_PEM).exists() && !dir.join(NEXT_KEY).exists());
        assert_eq!(mode(&dir.join(ANCHOR_KEY)), 0o600);
        let auth3 = load(&dir);
        assert_eq!(auth3.issuer_anchor_fingerprint(), new);
        let t3 = SystemTime::now();
        let leaf3 = auth3.mint(&workload(), ttl, t3).unwrap();
        assert!(verifies(&dir, &leaf3.chain, t3));
        assert!(verifies(&dir, &leaf2.chain, t2));
        assert!(
            !verifies(&dir, &leaf1.chain, t1),
            "the old chain must no longer verify"
        );
        assert!(!verifies(&dir, &leaf0.chain, t0));

        let json = trust_ok(&["status", "--dir", d, "--json"]);
        assert!(json.contains(&new) && !json.contains(&old), "{json}");
        assert!(json.contains("\"phase\":\"stable\""), "{json}");
        let state = TrustDir { path: dir.clone() }.read_state().unwrap();
        assert!(state.last_rotation >= t2);
    }

    #[test]
    fn early_steps_are_refused_unless_forced() {
        let tmp = TempDir::new("force");
        let dir = tmp.0.join("trust");
        let d = dir.to_str().unwrap();
        trust_ok(&["init", "--dir", d, "--trust-domain", "example.org"]);
        trust_ok(&["rotate", "--dir", d]);

        let err = trust_err(&["rotate", "--dir", d]);
        assert!(
            err.contains("not yet safe: step 2/3 (switch-issuer)"),
            "{err}"
        );
        assert!(
            err.contains("propagation delay (1h)") && err.contains("--force"),
            "{err}"
        );
        assert!(err.contains("in 59m") || err.contains("in 1h 0m"), "{err}");

        let err = trust_err(&["renew-issuer", "--dir", d]);
        assert!(err.contains("rotation is in progress"), "{err}");

        // A bundle edited in the middle of a rotation stops it.
        let bundle = fs::read(dir.join(BUNDLE)).unwrap();
        fs::write(dir.join(BUNDLE), fs::read(dir.join(ANCHOR_PEM)).unwrap()).unwrap();
        let err = trust_err(&["rotate", "--dir", d, "--force"]);
        assert!(err.contains("restore it"), "{err}");
        fs::write(dir.join(BUNDLE), bundle).unwrap();

        let out = trust_ok(&["rotate", "--dir", d, "--force"]);
        assert!(
            out.contains("warning: --force") && out.contains("step 2/3"),
            "{out}"
        );
        // A shorter delay given on the command line is stored with the step.
        let out = trust_err(&["rotate", "--dir", d, "--max-leaf-lifetime", "3h"]);
        assert!(out.contains("max leaf lifetime 3h"), "{out}");
        let state = TrustDir { path: dir.clone() }.read_state().unwrap();
        assert_eq!(state.rotation.phase(), "issuer-switched");
        assert_eq!(state.settings.max_leaf_lifetime, certs::DEFAULT_LEAF_TTL);
    }

    #[test]
    fn a_rotation_can_be_aborted_before_the_issuer_switch() {
        let tmp = TempDir::new("abort");
        let dir = tmp.0.join("trust");
        let d = dir.to_str().unwrap();
        trust_ok(&["init", "--dir", d, "--trust-domain", "example.org"]);
        let anchor = fingerprint(&dir.join(ANCHOR_PEM));
        let err = trust_err(&["rotate", "--dir", d, "--abort"]);
        assert!(err.contains("no rotation is in progress"), "{err}");

        trust_ok(&["rotate", "--dir", d]);
        assert_eq!(bundle_ids(&dir).len(), 2);
        let out = trust_ok(&["rotate", "--dir", d, "--abort"]);
        assert!(out.contains("rotation aborted"), "{out}");
        assert_eq!(bundle_ids(&dir), vec![anchor.clone()]);
        assert!(!dir.join(NEXT_PEM).exists() && !dir.join(NEXT_KEY).exists());
        assert!(trust_ok(&["status", "--dir", d]).contains("rotation: stable"));
        assert_eq!(load(&dir).issuer_anchor_fingerprint(), anchor);

        // After the switch there is no way back.
        trust_ok(&["rotate", "--dir", d]);
        trust_ok(&["rotate", "--dir", d, "--force"]);
        let err = trust_err(&["rotate", "--dir", d, "--abort"]);
        assert!(err.contains("only be aborted before"), "{err}");
    }

    #[test]
    fn renew_issuer_replaces_only_the_issuer() {
        let tmp = TempDir::new("renew");
        let dir = tmp.0.join("trust");
        let d = dir.to_str().unwrap();
        trust_ok(&["init", "--dir", d, "--trust-domain", "example.org"]);
        let anchor = fingerprint(&dir.join(ANCHOR_PEM));
        let bundle = fs::read(dir.join(BUNDLE)).unwrap();
        let issuer = fingerprint(&dir.join(ISSUER));
        let out = trust_ok(&["renew-issuer", "--dir", d]);
        assert!(
            out.contains("issuer renewed") && out.contains("Renew again by"),
            "{out}"
        );
        assert_ne!(fingerprint(&dir.join(ISSUER)), issuer);
        assert_eq!(fingerprint(&dir.join(ANCHOR_PEM)), anchor);
        assert_eq!(fs::read(dir.join(BUNDLE)).unwrap(), bundle);
        assert_eq!(mode(&dir.join(ISSUER)), 0o600);
        assert_eq!(load(&dir).issuer_anchor_fingerprint(), anchor);
    }

    #[test]
    fn loose_key_permissions_are_refused() {
        let tmp = TempDir::new("perm");
        let dir = tmp.0.join("trust");
        let d = dir.to_str().unwrap();
        trust_ok(&["init", "--dir", d, "--trust-domain", "example.org"]);
        fs::set_permissions(dir.join(ANCHOR_KEY), fs::Permissions::from_mode(0o640)).unwrap();
        let err = trust_err(&["renew-issuer", "--dir", d]);
        assert!(
            err.contains("chmod 600") && err.contains(ANCHOR_KEY),
            "{err}"
        );
        let err = trust_err(&["status", "--dir", d]);
        assert!(
            err.contains("PROBLEM") && err.contains("chmod 600"),
            "{err}"
        );
    }

    #[test]
    fn status_fails_on_expired_material() {
        let tmp = TempDir::new("expired");
        let td: TrustDomain = "example.org".parse().unwrap();
        let then = SystemTime::now() - Duration::from_secs(3 * 86_400);
        let anchor = certs::new_trust_anchor(&td, Duration::from_secs(86_400), then).unwrap();
        let issuer = certs::new_issuer(&anchor, Duration::from_secs(86_400), then).unwrap();
        let dir = TrustDir {
            path: tmp.0.clone(),
        };
        dir.write_bundle(&[&anchor]).unwrap();
        dir.write_issuer(&issuer).unwrap();
        let (b, i) = (dir.file(BUNDLE), dir.file(ISSUER));
        let args = [
            "status",
            "--bundle",
            b.to_str().unwrap(),
            "--issuer",
            i.to_str().unwrap(),
        ];
        let err = trust_err(&args);
        assert!(err.contains("EXPIRED") && err.contains("PROBLEM"), "{err}");
        assert!(err.contains("problem"), "{err}");
        let mut json_args = args.to_vec();
        json_args.push("--json");
        let err = trust_err(&json_args);
        assert!(
            err.contains("\"expired\":true") && err.contains("\"ok\":false"),
            "{err}"
        );
    }

    #[test]
    fn settings_are_validated_and_round_trip() {
        let tmp = TempDir::new("settings");
        let d = tmp.0.join("trust");
        let err = trust_err(&[
            "init",
            "--dir",
            d.to_str().unwrap(),
            "--trust-domain",
            "example.org",
            "--rotation-period",
            "365d",
        ]);
        assert!(err.contains("anchor validity"), "{err}");
        assert!(
            !d.exists(),
            "nothing is written when the settings are refused"
        );

        for secs in [0, 1, 59, 60, 90, 3600, 5400, 86_400, 90 * 86_400, 100_000] {
            let dur = Duration::from_secs(secs);
            assert_eq!(
                humantime::parse_duration(&fmt_dur(dur)).unwrap(),
                dur,
                "{secs}"
            );
        }
        let dur = Duration::from_millis(1500);
        assert_eq!(humantime::parse_duration(&fmt_dur(dur)).unwrap(), dur);
        assert_eq!(fmt_dur(Duration::from_secs(90 * 86_400)), "90d");

        let state = State {
            version: STATE_VERSION,
            trust_domain: "example.org".into(),
            initialized: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            last_rotation: UNIX_EPOCH + Duration::from_nanos(1_700_000_001_500_000_000),
            issuer_issued: UNIX_EPOCH + Duration::from_secs(1_700_000_002),
            settings: Settings {
                anchor_validity: Duration::from_secs(365 * 86_400),
                issuer_validity: Duration::from_secs(30 * 86_400),
                rotation_period: Duration::from_secs(90 * 86_400),
                propagation_delay: Duration::from_secs(3600),
                max_leaf_lifetime: Duration::from_secs(86_400),
                clock_skew: Duration::from_secs(300),
            },
            rotation: Rotation::IssuerSwitched {
                anchor_added: UNIX_EPOCH + Duration::from_secs(1_700_000_003),
                issuer_switched: UNIX_EPOCH + Duration::from_secs(1_700_000_004),
            },
        };
        let text = toml::to_string(&state).unwrap();
        assert!(text.contains("phase = \"issuer-switched\""), "{text}");
        assert_eq!(toml::from_str::<State>(&text).unwrap(), state);
    }

    #[test]
    fn next_step_times() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let mut state = State {
            version: STATE_VERSION,
            trust_domain: "example.org".into(),
            initialized: t,
            last_rotation: t,
            issuer_issued: t,
            settings: Settings {
                anchor_validity: Duration::from_secs(365 * 86_400),
                issuer_validity: Duration::from_secs(30 * 86_400),
                rotation_period: Duration::from_secs(90 * 86_400),
                propagation_delay: Duration::from_secs(3600),
                max_leaf_lifetime: Duration::from_secs(86_400),
                clock_skew: Duration::from_secs(300),
            },
            rotation: Rotation::Stable,
        };
        assert_eq!(next_step(&state).name, "add-anchor");
        assert!(next_step(&state).safe_from.is_none());
        state.rotation = Rotation::AnchorAdded { anchor_added: t };
        let whole = UNIX_EPOCH + Duration::from_secs(1_700_000_001);
        assert_eq!(
            next_step(&state).safe_from,
            Some(whole + Duration::from_secs(3600))
        );
        state.rotation = Rotation::IssuerSwitched {
            anchor_added: t,
            issuer_switched: t,
        };
        assert_eq!(
            next_step(&state).safe_from,
            Some(whole + Duration::from_secs(3600 + 86_400 + 300))
        );
    }

    #[test]
    fn relative_times_read_well() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(relative(now, now), "now");
        assert_eq!(
            relative(now + Duration::from_millis(300), now),
            "in under a second"
        );
        assert_eq!(relative(now + Duration::from_secs(42), now), "in 42s");
        assert_eq!(relative(now + Duration::from_secs(3599), now), "in 59m 59s");
        assert_eq!(
            relative(now + Duration::from_secs(3 * 3600 + 60), now),
            "in 3h 1m"
        );
        assert_eq!(
            relative(now + Duration::from_secs(89 * 86_400 + 5), now),
            "in 89 days"
        );
        assert_eq!(relative(now - Duration::from_secs(7200), now), "2h 0m ago");
    }

    #[test]
    fn json_is_escaped() {
        let mut s = String::new();
        Json::Obj(vec![
            ("a", Json::str("q\"b\\n\n\u{1}é")),
            (
                "b",
                Json::Arr(vec![Json::Int(-3), Json::Bool(true), Json::Null]),
            ),
        ])
        .write(&mut s);
        assert_eq!(s, r#"{"a":"q\"b\\n\n\u0001é","b":[-3,true,null]}"#);
    }
}
