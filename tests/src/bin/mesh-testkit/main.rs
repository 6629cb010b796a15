//! `mesh-testkit`: a plain TCP server and client for the integration tests.
//!
//! It stands for the "unmodified program" inside a task: it knows nothing about the mesh,
//! it only moves deterministic bytes and checks that they arrive intact.
//!
//! ```text
//! mesh-testkit serve  --listen ADDR --mode http|httpecho|echo|halfclose|abort|watch|flaky|slow [--reply-bytes N] [--fail-percent P] [--delay-ms D]
//! mesh-testkit client --connect ADDR --mode halfclose --send-bytes N --expect-bytes M
//! mesh-testkit client --connect ADDR --mode abort|until-end --send-bytes N
//! mesh-testkit client --connect ADDR --mode upload
//! mesh-testkit client --connect ADDR --mode echo --send-bytes N
//! mesh-testkit client --connect ADDR --mode concurrent --connections C --send-bytes K
//! mesh-testkit client --connect ADDR --mode hold --seconds S
//! mesh-testkit client --connect ADDR --mode load --stop-file PATH [--workers W]
//!                     [--long-lived L] [--send-bytes K] [--interval-ms I]
//! mesh-testkit mint   --issuer ISSUER_PEM | --new-ca true  --spiffe-id ID
//!                     [--validity current|expired] --dir DIR [--stem NAME]
//! mesh-testkit ecs-agent --listen ADDR --state FILE
//! mesh-testkit grpc-serve --listen ADDR
//! mesh-testkit grpc-call --connect ADDR --path /pkg.Svc/Method --authority HOST
//! ```
//! Every client mode also takes `--timeout SECS` (default 30): no single connect, read or
//! write may block longer, so a broken path fails instead of hanging; and `--io poll` to use
//! non-blocking sockets and wait in poll(2), as event-loop programs do (default: blocking). Exit status: 0 on
//! success (with one `ok ...` summary line on stdout), 1 on failure (reason on stderr),
//! 2 on bad arguments. `load` also prints `progress ok=N failed=M` every 250 ms and one
//! `failure t_ms=T <what>: <error>` line per failed request, as they happen; it stops
//! once the stop file exists and fails if any request failed. `ecs-agent` is a stand-in of
//! the ECS agent's introspection API and credentials endpoint serving the state file
//! (see `ecs_agent.rs` and `mesh_testbed::ecs`); it runs until killed.

mod args;
mod client;
mod ecs_agent;
mod ends;
mod grpc;
mod mint;
mod pattern;
mod serve;

use std::process::ExitCode;

const USAGE: &str = "usage:
  mesh-testkit serve  --listen ADDR --mode http|httpecho|echo|halfclose|flaky|slow [--reply-bytes N] [--fail-percent P] [--delay-ms D]
  mesh-testkit client --connect ADDR --mode halfclose|echo|concurrent|hold|load
                      [--send-bytes N] [--expect-bytes M] [--connections C] [--seconds S]
                      [--stop-file PATH] [--workers W] [--long-lived L] [--interval-ms I]
                      [--timeout SECS] [--io blocking|poll]
  mesh-testkit mint   --issuer ISSUER_PEM | --new-ca true  --spiffe-id ID
                      [--validity current|expired] --dir DIR [--stem NAME]
  mesh-testkit ecs-agent --listen ADDR --state FILE
  mesh-testkit grpc-serve --listen ADDR
  mesh-testkit grpc-call --connect ADDR --path /pkg.Svc/Method --authority HOST [--timeout SECS]";

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let command = argv.next();
    let parsed = args::Args::parse(argv);
    let outcome = match (command.as_deref(), parsed) {
        (Some("serve"), Ok(args)) => serve::Options::from_args(&args).map(serve::run),
        (Some("client"), Ok(args)) => client::Options::from_args(&args).map(client::run),
        (Some("mint"), Ok(args)) => mint::Options::from_args(&args).map(mint::run),
        (Some("ecs-agent"), Ok(args)) => ecs_agent::Options::from_args(&args).map(ecs_agent::run),
        (Some("grpc-serve"), Ok(args)) => grpc::ServeOptions::from_args(&args).map(grpc::serve),
        (Some("grpc-call"), Ok(args)) => grpc::CallOptions::from_args(&args).map(grpc::call),
        (Some("-h" | "--help"), _) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        (_, Err(e)) => Err(e),
        _ => Err(
            "expected a subcommand: serve, client, mint, ecs-agent, grpc-serve or grpc-call"
                .to_string(),
        ),
    };
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(usage) => {
            eprintln!("error: {usage}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
