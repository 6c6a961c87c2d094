//! The `gridcast` command line. Thin: parse arguments, call the library, report errors.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use gridcast::app::demo;
use gridcast::driver::{self, Chosen, IoBackend};
use gridcast::keys::ChannelKey;

/// mimalloc: fast, low-fragmentation allocation for long-running relays with many buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// gridcast: a peer-to-peer live streaming grid.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a channel key and print the channel id.
    ///
    /// The key file is the channel: whoever holds it can broadcast on the channel, so it is
    /// written with mode 0600 and never overwritten unless --force is given.
    ///
    /// Example:
    ///   gridcast keygen --out channel.key
    Keygen {
        /// Where to write the key file.
        #[arg(short, long, default_value = "channel.key")]
        out: PathBuf,
        /// Replace an existing key file (the old channel is lost for good).
        #[arg(long)]
        force: bool,
    },
    /// Print the channel id of an existing key file.
    ///
    /// Example:
    ///   gridcast channel-id channel.key
    ChannelId {
        /// The key file.
        key: PathBuf,
    },
    /// Run a whole grid on 127.0.0.1 and report what every viewer played.
    ///
    /// Starts a source fed with a built-in test stream (MPEG-TS, generated in-process), three
    /// supernodes and six peers, each a real node on real UDP sockets. Halfway through, one
    /// supernode is killed without warning. The report gives each peer's continuity, whether
    /// its bytes match the source's exactly, its start-up time and failovers, and the source's
    /// upload beside the bytes delivered. Exits non-zero if any peer missed a chunk or played a
    /// wrong byte.
    ///
    /// Examples:
    ///   gridcast demo
    ///   gridcast demo --json | jq .continuity_min
    ///   gridcast demo --peers 20 --duration 30
    Demo {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Peers.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u16).range(1..=200))]
        peers: u16,
        /// Supernodes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=20))]
        supernodes: u16,
        /// Seconds the source streams.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(4..=3600))]
        duration: u64,
        /// Keep every supernode alive.
        #[arg(long)]
        no_kill: bool,
        /// auto, uring or portable.
        #[arg(long, default_value = "auto", value_parser = clap::value_parser!(IoBackend))]
        io_backend: IoBackend,
    },
    /// Say which data plane this machine would run, and why.
    ///
    /// The io_uring backend needs Linux 6.0 or later and a process allowed to call
    /// io_uring_setup (container seccomp profiles and `kernel.io_uring_disabled` can refuse it).
    /// Where it is refused, `auto` runs the portable backend.
    ///
    /// Examples:
    ///   gridcast io-check
    ///   gridcast io-check --io-backend uring    # fails if io_uring is refused
    IoCheck {
        /// auto, uring or portable.
        #[arg(long, default_value = "auto", value_parser = clap::value_parser!(IoBackend))]
        io_backend: IoBackend,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { out, force } => {
            let key = ChannelKey::generate()?;
            key.save(&out, force)?;
            eprintln!(
                "wrote channel key to {} (mode 0600); keep it secret",
                out.display()
            );
            #[allow(clippy::print_stdout)]
            {
                println!("{}", key.channel_id());
            }
        }
        Command::ChannelId { key } => {
            let key = ChannelKey::load(&key)?;
            #[allow(clippy::print_stdout)]
            {
                println!("{}", key.channel_id());
            }
        }
        Command::Demo {
            json,
            peers,
            supernodes,
            duration,
            no_kill,
            io_backend,
        } => {
            let config = demo::DemoConfig {
                supernodes: supernodes.into(),
                peers: peers.into(),
                duration: Duration::from_secs(duration),
                kill: !no_kill,
                backend: io_backend,
                ..Default::default()
            };
            let report = demo::run(&config, |line| eprintln!("{line}"))?;
            #[allow(clippy::print_stdout)]
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            if !report.perfect() {
                anyhow::bail!("a peer missed a chunk or played a wrong byte");
            }
        }
        Command::IoCheck { io_backend } => {
            let chosen = driver::choose(io_backend)?;
            let why = match (chosen, io_backend) {
                (Chosen::Uring, _) => {
                    "io_uring works here (multishot recvmsg into provided buffers)".to_owned()
                }
                (Chosen::Portable, IoBackend::Portable) => {
                    "forced by --io-backend portable".to_owned()
                }
                (Chosen::Portable, _) => match driver::uring_available() {
                    Ok(()) => "io_uring became available while checking".to_owned(),
                    Err(e) => format!("io_uring unavailable: {e}"),
                },
            };
            #[allow(clippy::print_stdout)]
            {
                println!("{chosen}: {why}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gridcast: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
