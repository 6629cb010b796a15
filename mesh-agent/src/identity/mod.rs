//! Workload identity: SPIFFE ids derived from IAM roles, the certificate chain
//! trust anchor -> issuer -> workload leaf, the agent-side trust material, and the operator's
//! `mesh-agent trust` commands. The model, the ARN mapping and the rotation runbook are in
//! docs/identity.md.

pub mod arn;
pub mod authority;
pub mod certs;
pub mod cli;
pub mod spiffe;

// What the rest of the agent uses; everything else is reachable through the submodules.
pub use arn::RoleArn;
pub use authority::{Authority, WorkloadCert};
pub use spiffe::{SpiffeId, TrustDomain, spiffe_id_of_cert};
