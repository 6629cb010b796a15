//! `mint`: test certificates for probing the agent's tunnel by hand (the tests call
//! `mesh_testbed::pki` directly).

use std::path::PathBuf;

use anyhow::Result;
use mesh_testbed::pki::{TestCa, Validity};

use crate::args::Args;

pub struct Options {
    /// `Some(issuer.pem)`: the agent's issuer; `None`: a new self-signed CA.
    issuer: Option<PathBuf>,
    spiffe_id: String,
    validity: Validity,
    dir: PathBuf,
    stem: String,
}

impl Options {
    pub fn from_args(args: &Args) -> Result<Self, String> {
        args.only(&["issuer", "new-ca", "spiffe-id", "validity", "dir", "stem"])?;
        let issuer: Option<PathBuf> = args.optional("issuer")?;
        let new_ca: Option<String> = args.optional("new-ca")?;
        match (&issuer, new_ca.as_deref()) {
            (Some(_), None) | (None, Some("true")) => {}
            _ => return Err("give exactly one of --issuer FILE and --new-ca true".into()),
        }
        let validity = match args.optional::<String>("validity")?.as_deref() {
            None | Some("current") => Validity::Current,
            Some("expired") => Validity::Expired,
            Some(other) => return Err(format!("--validity: current or expired, not {other:?}")),
        };
        Ok(Self {
            issuer,
            spiffe_id: args.required("spiffe-id")?,
            validity,
            dir: args.required("dir")?,
            stem: args.optional("stem")?.unwrap_or_else(|| "leaf".to_string()),
        })
    }
}

pub fn run(opts: Options) -> Result<()> {
    let ca = match &opts.issuer {
        Some(path) => TestCa::load(path)?,
        None => TestCa::self_signed("mesh-testkit other CA")?,
    };
    let files = ca.mint(&opts.spiffe_id, opts.validity, &opts.dir, &opts.stem)?;
    println!(
        "ok cert={} chain={} key={}",
        files.cert.display(),
        files.chain.display(),
        files.key.display()
    );
    Ok(())
}
