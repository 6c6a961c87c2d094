//! The `gridcast` command line. Thin: parse arguments, call the library, report errors.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use gridcast::app::{config, demo, roles};
use gridcast::driver::{self, Chosen, IoBackend};
use gridcast::keys::{ChannelKey, NodeKey};

/// mimalloc: fast, low-fragmentation allocation for long-running relays with many buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// gridcast: a peer-to-peer live streaming grid.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// What to log: a level (error, warn, info, debug or trace), or a default level and
    /// per-module ones, like `info,gridcast::node=debug` or `warn,quinn_proto=error` (RUST_LOG
    /// is the default; a module named with no default level logs alone).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info",
          value_parser = parse_log_filter)]
    log_level: Targets,
    /// Log lines as JSON objects (for servers whose logs are collected).
    #[arg(long, global = true)]
    log_json: bool,
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
    /// Print the node id of a node key file (a relay's or source's `--node-key`): what a link
    /// names after the node's address.
    ///
    /// Example:
    ///   gridcast node-id relay.key
    NodeId {
        /// The node key file.
        key: PathBuf,
    },
    /// Put a live stream on the grid: read bytes, cut, sign, encode and serve them.
    ///
    /// Prints the channel link (gridcast://<channel-id>@<host:port>/<node-id>) on stdout;
    /// supernodes join with it. Input: - (stdin), a file, tcp://addr (listen; one sender at a
    /// time), udp://addr (unicast or multicast MPEG-TS) or icecast://addr/mount (an
    /// Icecast-compatible source endpoint for ffmpeg, BUTT, liquidsoap, ices). Ogg and
    /// fragmented MP4 stream headers are captured and replayed to late joiners; MP3 and AAC
    /// (ADTS) are cut where frames start.
    ///
    /// Examples:
    ///   ffmpeg -re -i show.mkv -c copy -f mpegts - | gridcast broadcast --key channel.key
    ///   gridcast broadcast --key channel.key --input udp://239.1.1.1:5000
    ///   gridcast broadcast --key channel.key --input recording.ts --rate 2M
    ///   GRIDCAST_SOURCE_PASSWORD=hackme gridcast broadcast --key channel.key \
    ///       --input icecast://0.0.0.0:8000/radio.ogg
    ///   gridcast broadcast --config broadcast.toml
    Broadcast(config::BroadcastArgs),
    /// Run a supernode: carry channels and fan their substreams out.
    ///
    /// Prints one channel link per carried channel, naming this node; viewers play from it.
    /// SIGTERM or SIGINT drains: subscribers are told to move to other parents, and the relay
    /// exits once they have or the drain timeout passes.
    ///
    /// Examples:
    ///   gridcast relay --join gridcast://<channel-id>@source.example:4433/<node-id>
    ///   gridcast relay --listen 0.0.0.0:4500 --workers 4 --node-key relay.key --join <link>
    ///   gridcast relay --config /etc/gridcast/relay.toml
    Relay(config::RelayArgs),
    /// Watch or listen: draw a channel from several parents and write the exact stream.
    ///
    /// On a terminal, a live status line on stderr shows parents, substreams held / needed,
    /// buffer, bitrate, continuity, bytes uploaded to other peers and the title playing (a
    /// radio's song title, when its source sets one; HTTP players that ask for ICY metadata
    /// get it too).
    ///
    /// Examples:
    ///   gridcast play gridcast://<channel-id>@relay.example:4434/<node-id> | mpv -
    ///   gridcast play <link> --output show.ts
    ///   gridcast play <link> --output http://127.0.0.1:8080/    # then: mpv http://127.0.0.1:8080/
    ///   gridcast play <link> --upload 0 | ffplay -
    Play(config::PlayArgs),
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
        Command::NodeId { key } => {
            let key = NodeKey::load(&key)?;
            #[allow(clippy::print_stdout)]
            {
                println!("{}", key.node_id());
            }
        }
        Command::Broadcast(args) if args.check_config => {
            let mut config = args.resolve()?;
            // Never printed: say only that it is set.
            if config.source_password.is_some() {
                config.source_password = Some("(set, not shown)".to_owned());
            }
            checked(&config);
        }
        Command::Relay(args) if args.check_config => checked(&args.resolve()?),
        Command::Play(args) if args.check_config => checked(&args.resolve()?),
        Command::Broadcast(args) => {
            roles::broadcast(&args.resolve()?, &*roles::stop_flag()?)?;
        }
        Command::Relay(args) => {
            roles::relay(&args.resolve()?, &*roles::stop_flag()?)?;
        }
        Command::Play(args) => {
            roles::play(&args.resolve()?, &*roles::stop_flag()?)?;
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
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let filter = cli.log_level.clone();
    if cli.log_json {
        tracing_subscriber::registry()
            .with(logs.json().with_filter(filter))
            .init();
    } else {
        tracing_subscriber::registry()
            .with(logs.with_filter(filter))
            .init();
    }
    raise_file_limit();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gridcast: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--log-level` and RUST_LOG: `tracing-subscriber`'s target directives (`level` or
/// `target=level`, comma-separated), with an error that says what is expected.
fn parse_log_filter(text: &str) -> Result<Targets, String> {
    text.trim().parse().map_err(|e| {
        format!("{e} (give a level, or directives like \"info,gridcast::node=debug\")")
    })
}

/// `--check-config`: the settings resolved without error; print them.
#[allow(clippy::print_stdout)]
fn checked(config: &dyn std::fmt::Debug) {
    println!("{config:#?}");
    println!("config ok");
}

/// Raises the soft limit on open files to the hard one, as network daemons do: a node holds a
/// socket per HTTP client (players, scrapes, idle ones) besides its UDP sockets and rings,
/// and the usual soft default of 1024 would refuse new ones long before the machine must.
fn raise_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(err) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(%err, "open-file limit not raised");
        }
    }
}
