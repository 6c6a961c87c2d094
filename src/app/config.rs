//! One settings struct per role, filled from the command line, the environment and a TOML file.
//!
//! Each role's `*Args` struct is at once its clap arguments and its config-file schema: every
//! setting has the same name in both (`--max-upload` is `max_upload`). A setting given on the
//! command line wins over its environment variable, which wins over the file, which wins over
//! the built-in default. An unknown key or a bad value in the file is an error that names it,
//! with its line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use super::link::{ChannelLink, LinkNode};
use super::ops::AdminListen;
use super::roles::{
    BroadcastConfig, Input, Output, PlayConfig, RelayConfig, UploadPriority, parse_rate,
};
use crate::driver::IoBackend;

/// A rate in bits per second; on the command line and in files a number with an optional `k`,
/// `M` or `G` suffix (`"2M"`), or a plain integer in files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate(pub u64);

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_rate(s).map(Self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Self(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Types that read from a string in config files exactly as on the command line.
macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
deserialize_from_str!(
    Input,
    Output,
    ChannelLink,
    LinkNode,
    IoBackend,
    UploadPriority
);

/// Parses a channel link argument. clap's own error would quote the whole value, which for a
/// pasted blob is pages of text; this quotes its start only.
#[derive(Clone, Copy, Debug)]
pub struct LinkParser;

impl clap::builder::TypedValueParser for LinkParser {
    type Value = ChannelLink;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<ChannelLink, clap::Error> {
        let text = value.to_string_lossy();
        text.parse().map_err(|e: super::link::LinkError| {
            let shown: String = text.chars().take(60).collect();
            let more = if shown.len() < text.len() {
                format!("… ({} characters)", text.chars().count())
            } else {
                String::new()
            };
            let name = arg.map_or_else(|| "link".to_owned(), ToString::to_string);
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value '{shown}{more}' for '{name}': {e}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

/// Reads a role's TOML file; unknown keys and bad values are errors naming the file and key.
fn load<T: for<'de> Deserialize<'de> + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), e.to_string().trim()))
}

/// A setting that takes one address or a list of them in the config file.
fn one_or_many<'de, D>(d: D) -> Result<Vec<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Addrs;
    fn parse<E: serde::de::Error>(text: &str) -> Result<SocketAddr, E> {
        text.parse().map_err(|_| {
            E::custom(format!(
                "{text:?} is not an address and port, like 203.0.113.7:4434 or [2001:db8::7]:4434"
            ))
        })
    }
    impl<'de> serde::de::Visitor<'de> for Addrs {
        type Value = Vec<SocketAddr>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an address and port, or a list of them")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(vec![parse(text)?])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(text) = seq.next_element::<String>()? {
                out.push(parse(&text)?);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Addrs)
}

/// The addresses to announce: the command line's (or environment's) if any, else the
/// file's; each once, and no more than a node announces (its first and
/// [`crate::node::directory::MAX_ALSO`] others).
fn advertised(given: Vec<SocketAddr>, file: Vec<SocketAddr>) -> anyhow::Result<Vec<SocketAddr>> {
    let list = if given.is_empty() { file } else { given };
    let mut out: Vec<SocketAddr> = Vec::with_capacity(list.len());
    for addr in list {
        if addr.ip().is_unspecified() || addr.port() == 0 {
            anyhow::bail!(
                "advertise: {addr} cannot be dialled; give the address and port other nodes reach this one at"
            );
        }
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    let most = 1 + crate::node::directory::MAX_ALSO;
    if out.len() > most {
        anyhow::bail!("advertise: at most {most} addresses, not {}", out.len());
    }
    Ok(out)
}

/// The most a player may be told to play behind live, in milliseconds: half of what the
/// window every node keeps holds at the default chunk duration (40 chunks of 250 ms).
const MAX_DELAY_MS: u64 = 5000;

/// The chunk durations a broadcast accepts, in milliseconds. At the low end the window every
/// node keeps (40 chunks) still holds 4 s, enough to start 1.5 s behind live and resume
/// after a parent change; at the high end a stream's gaps between chunks stay a second short
/// of the 3 s after which parents that lack nothing are taken for a lost stream.
const CHUNK_MS: std::ops::RangeInclusive<u64> = 100..=2000;

/// `gridcast broadcast` settings.
#[derive(Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct BroadcastArgs {
    /// A TOML file with any of these settings (keys as the long options, with _ for -).
    #[arg(long, env = "GRIDCAST_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Resolve and check the settings (file, environment, command line), print them, and
    /// exit: non-zero, naming the bad setting, if one is wrong.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
    /// The channel key file (from `gridcast keygen`).
    #[arg(long, env = "GRIDCAST_KEY")]
    pub key: Option<PathBuf>,
    /// -, a file path, tcp://host:port, udp://host:port or icecast://host:port/mount
    /// [default: -].
    #[arg(long)]
    pub input: Option<Input>,
    /// Pace a file input at this many bits per second, like 2M (default: as fast as read).
    #[arg(long)]
    pub rate: Option<Rate>,
    /// Milliseconds of stream per chunk, 100 to 2000 [default: 1000 for audio alone (MP3,
    /// AAC, Ogg with no video stream), 250 for anything else]. Longer chunks cost every relay
    /// less per listener (fewer, fuller packets and acknowledgements: 1000 halves a relay's
    /// CPU per radio listener at 128 kbit/s) and put listeners further behind live.
    #[arg(long)]
    pub chunk_ms: Option<u64>,
    /// UDP address to serve supernodes on [default: [::]:4433, every IPv6 and IPv4 address;
    /// 0.0.0.0:4433 on a host without IPv6].
    #[arg(long, env = "GRIDCAST_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Seconds to keep serving after the input ends, or after SIGINT or SIGTERM ends the
    /// broadcast (a second signal stops at once) [default: 5].
    #[arg(long)]
    pub linger: Option<u64>,
    /// The password icecast:// encoders must give (any user name), and song title updates on
    /// the icecast:// port or the --admin listener's /admin/metadata.
    #[arg(long, env = "GRIDCAST_SOURCE_PASSWORD", hide_env_values = true)]
    pub source_password: Option<String>,
    /// Node key file, created if missing, so the source's node id (and its link) survives
    /// restarts [default: a fresh key each run].
    #[arg(long, env = "GRIDCAST_NODE_KEY")]
    pub node_key: Option<PathBuf>,
    /// The first tier: at most this many child connections; once a relay carries the channel,
    /// viewers asking the source are sent to the relays [default: 8].
    #[arg(long)]
    pub max_children: Option<usize>,
    /// The address relays dial this source at, announced to the supernodes; repeat it (or
    /// give a list) for the source's other addresses, its IPv6 and IPv4 ones say, the first
    /// being the one it is a member at [default: the listening address; for a wildcard one,
    /// the address the first relay or viewer reached].
    #[arg(long, env = "GRIDCAST_ADVERTISE", value_delimiter = ',')]
    #[serde(default, deserialize_with = "one_or_many")]
    pub advertise: Vec<SocketAddr>,
    /// auto, uring or portable [default: auto].
    #[arg(long, env = "GRIDCAST_IO_BACKEND")]
    pub io_backend: Option<IoBackend>,
    /// Admin listener (/metrics, /livez, /readyz, /debug/channels, and /admin/metadata for
    /// song titles, with the source password): host:port or off [default: off].
    #[arg(long, env = "GRIDCAST_ADMIN")]
    pub admin: Option<AdminListen>,
}

impl BroadcastArgs {
    /// The settings, with the config file under the command line and environment.
    pub fn resolve(self) -> anyhow::Result<BroadcastConfig> {
        let file: Self = load(self.config.as_deref())?;
        let key = self
            .key
            .or(file.key)
            .context("no channel key: give --key, GRIDCAST_KEY or `key` in the config file")?;
        let rate = self.rate.or(file.rate).map(|r| r.0);
        let input = match (self.input.or(file.input).unwrap_or(Input::Stdin), rate) {
            (Input::File { path, .. }, rate) => Input::File {
                path,
                rate_bps: rate,
            },
            (_, Some(_)) => anyhow::bail!("rate paces a file input only"),
            (input, None) => input,
        };
        let chunk_ms = self.chunk_ms.or(file.chunk_ms);
        if let Some(chunk_ms) = chunk_ms
            && !CHUNK_MS.contains(&chunk_ms)
        {
            anyhow::bail!(
                "chunk_ms must be {} to {} (milliseconds), not {chunk_ms}: shorter chunks leave \
                 the window of {} chunks too short to ride out a parent change, longer ones \
                 go quiet long enough between chunks for a healthy stream to be taken for lost",
                CHUNK_MS.start(),
                CHUNK_MS.end(),
                crate::node::ChannelConfig::default().window_chunks,
            );
        }
        if self.max_children.or(file.max_children) == Some(0) {
            anyhow::bail!(
                "max_children must be at least 1: a source that serves nobody reaches nobody"
            );
        }
        Ok(BroadcastConfig {
            key,
            input,
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| super::roles::any_addr(4433)),
            linger: Duration::from_secs(self.linger.or(file.linger).unwrap_or(5)),
            chunk: chunk_ms.map(Duration::from_millis),
            source_password: self.source_password.or(file.source_password),
            node_key: self.node_key.or(file.node_key),
            max_children: self.max_children.or(file.max_children).unwrap_or(8),
            advertise: advertised(self.advertise, file.advertise)?,
            backend: self.io_backend.or(file.io_backend).unwrap_or_default(),
            admin: self.admin.or(file.admin),
        })
    }
}

/// `gridcast relay` settings.
#[derive(Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RelayArgs {
    /// A TOML file with any of these settings (keys as the long options, with _ for -).
    #[arg(long, env = "GRIDCAST_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Resolve and check the settings (file, environment, command line), print them, and
    /// exit: non-zero, naming the bad setting, if one is wrong.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
    /// A channel link to carry (repeat for more). The relay carries these channels and no
    /// other.
    #[arg(long, value_parser = LinkParser)]
    #[serde(default)]
    pub join: Vec<ChannelLink>,
    /// UDP address to serve on [default: [::]:4434, every IPv6 and IPv4 address; 0.0.0.0:4434
    /// on a host without IPv6].
    #[arg(long, env = "GRIDCAST_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// io_uring worker threads [default: one per core].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Node key file, created if missing, so the node id survives restarts.
    #[arg(long, env = "GRIDCAST_NODE_KEY")]
    pub node_key: Option<PathBuf>,
    /// The address other nodes dial this relay at, announced to the other supernodes;
    /// repeat it (or give a list) for the relay's other addresses, its IPv6 and IPv4 ones say,
    /// so that nodes of either family are sent to it, the first being the one it is a member
    /// at [default: the listening address; for a wildcard one, this relay's address on the
    /// path to its upstream].
    #[arg(long, env = "GRIDCAST_ADVERTISE", value_delimiter = ',')]
    #[serde(default, deserialize_with = "one_or_many")]
    pub advertise: Vec<SocketAddr>,
    /// Most bits per second sent to subscribers, like 500M [default: no limit].
    #[arg(long)]
    pub max_upload: Option<Rate>,
    /// normal: uploads compete like any other (CUBIC, random loss not taken for congestion);
    /// low: they yield to the host's other traffic (LEDBAT, a scavenger congestion controller
    /// that backs off when the uplink's queue grows), for a relay on a home connection
    /// [default: normal].
    #[arg(long)]
    pub upload_priority: Option<UploadPriority>,
    /// Most connections at once; more are refused [default: no limit].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most subscriptions at once; more are turned away with a go-away [default: no limit].
    #[arg(long)]
    pub max_subscribers: Option<usize>,
    /// Incoming handshakes under way beyond which a new address must first answer a QUIC
    /// Retry, so that a flood of Initials from forged addresses costs no state; 0 asks it of
    /// every address [default: 256].
    #[arg(long)]
    pub validate_above: Option<usize>,
    /// Seconds a drain (SIGTERM, SIGINT) may take before the relay exits [default: 10].
    #[arg(long)]
    pub drain_timeout: Option<u64>,
    /// Announce this relay on the local network (mDNS), so that players there find it by
    /// channel id alone (`gridcast play <channel id>`).
    #[arg(long)]
    #[serde(default)]
    pub mdns: bool,
    /// Carry any channel a player or relay asks for, finding its upstream through the grid
    /// (with `--bootstrap`), besides the channels joined.
    #[arg(long)]
    #[serde(default)]
    pub open: bool,
    /// A node of the grid (host:port/node-id, any kind) an open relay asks for a channel's
    /// upstream (repeat for more).
    #[arg(long)]
    #[serde(default)]
    pub bootstrap: Vec<LinkNode>,
    /// Most channels an open relay carries at once [default: 16].
    #[arg(long)]
    pub max_channels: Option<usize>,
    /// Seconds an open relay keeps a channel nobody watches [default: 60].
    #[arg(long)]
    pub idle_timeout: Option<u64>,
    /// auto, uring or portable [default: auto].
    #[arg(long, env = "GRIDCAST_IO_BACKEND")]
    pub io_backend: Option<IoBackend>,
    /// Admin listener (/metrics, /livez, /readyz, /debug/channels): host:port or off
    /// [default: 127.0.0.1:9464].
    #[arg(long, env = "GRIDCAST_ADMIN")]
    pub admin: Option<AdminListen>,
}

impl RelayArgs {
    /// The settings, with the config file under the command line and environment.
    pub fn resolve(self) -> anyhow::Result<RelayConfig> {
        let file: Self = load(self.config.as_deref())?;
        let join = if self.join.is_empty() {
            file.join
        } else {
            self.join
        };
        let open = self.open || file.open;
        let bootstrap = if self.bootstrap.is_empty() {
            file.bootstrap
        } else {
            self.bootstrap
        };
        if join.is_empty() && !open {
            anyhow::bail!(
                "nothing to carry: give --join <channel link> or `join = [...]` in the config \
                 file, or --open with --bootstrap <host:port/node-id>"
            );
        }
        if open && bootstrap.is_empty() && join.is_empty() {
            anyhow::bail!(
                "an open relay needs a node of the grid to ask: give --bootstrap \
                 <host:port/node-id> (or a --join link)"
            );
        }
        let max_channels = self.max_channels.or(file.max_channels).unwrap_or(16);
        if max_channels == 0 {
            anyhow::bail!("max_channels must be at least 1");
        }
        let workers = self
            .workers
            .or(file.workers)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
        if workers == 0 || workers > 256 {
            anyhow::bail!("workers must be between 1 and 256, not {workers}");
        }
        Ok(RelayConfig {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| super::roles::any_addr(4434)),
            join,
            workers,
            node_key: self.node_key.or(file.node_key),
            advertise: advertised(self.advertise, file.advertise)?,
            max_upload_bps: self.max_upload.or(file.max_upload).map(|r| r.0),
            upload_priority: self
                .upload_priority
                .or(file.upload_priority)
                .unwrap_or(UploadPriority::Normal),
            max_connections: self.max_connections.or(file.max_connections),
            max_subscribers: self.max_subscribers.or(file.max_subscribers),
            validate_above: self.validate_above.or(file.validate_above).unwrap_or(256),
            drain_timeout: Duration::from_secs(
                self.drain_timeout.or(file.drain_timeout).unwrap_or(10),
            ),
            mdns: self.mdns || file.mdns,
            open: open.then(|| super::roles::OpenRelay {
                bootstrap,
                max_channels,
                idle: Duration::from_secs(self.idle_timeout.or(file.idle_timeout).unwrap_or(60)),
            }),
            backend: self.io_backend.or(file.io_backend).unwrap_or_default(),
            admin: self.admin.or(file.admin),
        })
    }
}

/// `gridcast play` settings.
#[derive(Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PlayArgs {
    /// A TOML file with any of these settings (keys as the long options, with _ for -).
    #[arg(long, env = "GRIDCAST_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Resolve and check the settings (file, environment, command line), print them, and
    /// exit: non-zero, naming the bad setting, if one is wrong.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
    /// The channel link, or a bare channel id to find a node on the local network (mDNS).
    #[arg(value_parser = LinkParser)]
    pub link: Option<ChannelLink>,
    /// - (stdout), a file path, or http://127.0.0.1:port/ to serve local players [default: -].
    #[arg(long, short)]
    pub output: Option<Output>,
    /// Local UDP address [default: [::]:0, reaching IPv6 and IPv4 nodes; 0.0.0.0:0 on a host
    /// without IPv6].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Node key file, created if missing, so that a peer that relays keeps its node id (and
    /// the link it logs) across restarts [default: a new id each run].
    #[arg(long)]
    pub node_key: Option<PathBuf>,
    /// Seconds to wait for the first chunk; a player nobody serves by then exits with the
    /// reason (the channel is not carried, a node failed its proof, nobody answered)
    /// [default: 10].
    #[arg(long)]
    pub connect_timeout: Option<u64>,
    /// How far behind live to play, in milliseconds, 0 to 5000 [default: 1500]: the stream
    /// held ahead of the output rides out jitter and lost parents (every parent lost at once
    /// takes about 1.5 s to notice and replace); less is nearer live.
    #[arg(long)]
    pub delay_ms: Option<u64>,
    /// Most bits per second relayed to other peers, like 1M; 0 relays nothing
    /// [default: no cap].
    #[arg(long)]
    pub upload: Option<Rate>,
    /// low: relaying yields to this host's other traffic (a scavenger congestion controller,
    /// LEDBAT, that backs off when the uplink's queue grows); normal: it competes like any
    /// other upload (CUBIC, random loss not taken for congestion) [default: low].
    #[arg(long)]
    pub upload_priority: Option<UploadPriority>,
    /// No live status line (it is shown only when stderr is a terminal anyway).
    #[arg(long)]
    #[serde(default)]
    pub no_status: bool,
    /// Also look on the local network (mDNS) for nodes that carry the channel and prefer
    /// them to the link's, and announce this peer there while it relays. Implied by a bare
    /// channel id.
    #[arg(long)]
    #[serde(default)]
    pub mdns: bool,
    /// auto, uring or portable [default: auto].
    #[arg(long, env = "GRIDCAST_IO_BACKEND")]
    pub io_backend: Option<IoBackend>,
    /// Admin listener (/metrics, /livez, /readyz, /debug/channels): host:port or off
    /// [default: off].
    #[arg(long, env = "GRIDCAST_ADMIN")]
    pub admin: Option<AdminListen>,
}

impl PlayArgs {
    /// The settings, with the config file under the command line and environment.
    pub fn resolve(self) -> anyhow::Result<PlayConfig> {
        use std::io::IsTerminal;
        let file: Self = load(self.config.as_deref())?;
        let link = self
            .link
            .or(file.link)
            .context("no channel link: give one, or `link` in the config file")?;
        let delay_ms = self.delay_ms.or(file.delay_ms);
        if let Some(delay_ms) = delay_ms
            && delay_ms > MAX_DELAY_MS
        {
            anyhow::bail!(
                "delay_ms must be at most {MAX_DELAY_MS} (milliseconds), not {delay_ms}: the \
                 nodes a player draws from keep 10 s of 250-ms chunks, and a player must start \
                 well inside them"
            );
        }
        Ok(PlayConfig {
            // Unless told, the engine's own start delay.
            delay: delay_ms.map_or(
                crate::node::ChannelConfig::default().target_delay,
                Duration::from_millis,
            ),
            link,
            output: self.output.or(file.output).unwrap_or(Output::Stdout),
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| super::roles::any_addr(0)),
            backend: self.io_backend.or(file.io_backend).unwrap_or_default(),
            admin: self.admin.or(file.admin),
            node_key: self.node_key.or(file.node_key),
            connect_timeout: Duration::from_secs(
                self.connect_timeout.or(file.connect_timeout).unwrap_or(10),
            ),
            upload_bps: self.upload.or(file.upload).map(|r| r.0),
            upload_priority: self
                .upload_priority
                .or(file.upload_priority)
                .unwrap_or_default(),
            mdns: self.mdns || file.mdns,
            status: !(self.no_status || file.no_status) && std::io::stderr().is_terminal(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempFile(tempfile::NamedTempFile);

    impl TempFile {
        fn path(&self) -> PathBuf {
            self.0.path().to_owned()
        }
    }

    fn write(text: &str) -> TempFile {
        let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(f.path(), text).unwrap();
        TempFile(f)
    }

    fn link() -> String {
        let channel = crate::keys::ChannelKey::from_seed(&[5; 32]).channel_id();
        let node = crate::keys::NodeKey::generate().unwrap().node_id();
        ChannelLink::single(channel, "127.0.0.1:4433".parse().unwrap(), node).to_string()
    }

    #[test]
    fn relay_file_settings_sit_under_the_command_line() {
        let f = write(&format!(
            "join = [\"{}\"]\nlisten = \"127.0.0.1:5000\"\nworkers = 3\n\
             max_upload = \"200M\"\nmax_connections = 100\ndrain_timeout = 4\n\
             upload_priority = \"low\"\n",
            link()
        ));
        let args = RelayArgs {
            config: Some(f.path()),
            workers: Some(2),
            ..Default::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(config.workers, 2);
        assert_eq!(config.join.len(), 1);
        assert_eq!(config.max_upload_bps, Some(200_000_000));
        assert_eq!(config.upload_priority, UploadPriority::Low);
        // A relay's uploads compete unless it is told otherwise.
        let f = write(&format!("join = [\"{}\"]\n", link()));
        let plain = RelayArgs {
            config: Some(f.path()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(plain.upload_priority, UploadPriority::Normal);
        assert_eq!(config.max_connections, Some(100));
        assert_eq!(config.max_subscribers, None);
        assert_eq!(config.drain_timeout, Duration::from_secs(4));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let (f, err) = relay_err("lisen = \"127.0.0.1:5000\"\n");
        assert!(err.contains("unknown field `lisen`"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");
        let (_, err) = relay_err("listen = \"nowhere\"\n");
        assert!(err.contains("listen"), "{err}");
        let (_, err) = relay_err("upload_priority = \"lowest\"\n");
        assert!(
            err.contains("upload_priority") && err.contains("lowest"),
            "{err}"
        );
        let (_, err) = play_err("upload = \"fast\"\n");
        assert!(err.contains("upload") && err.contains("fast"), "{err}");
        let (_, err) = play_err("upload_priority = \"highest\"\n");
        assert!(
            err.contains("upload_priority") && err.contains("highest"),
            "{err}"
        );
        let f = write("\u{0}\u{1}garbage[[[\n");
        let err = BroadcastArgs {
            config: Some(f.path()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("config file"), "{err}");
        let missing = BroadcastArgs {
            config: Some("/nonexistent/gridcast.toml".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{missing:#}").contains("/nonexistent/gridcast.toml"));
    }

    #[test]
    fn broadcast_and_play_resolve_with_defaults() {
        let f = write(
            "key = \"channel.key\"\ninput = \"icecast://127.0.0.1:8000/live\"\n\
             source_password = \"pw\"\n",
        );
        let b = BroadcastArgs {
            config: Some(f.path()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(b.source_password.as_deref(), Some("pw"));
        assert!(matches!(b.input, Input::Icecast { .. }));
        assert_eq!(b.listen.port(), 4433);
        assert!(
            BroadcastArgs::default()
                .resolve()
                .unwrap_err()
                .to_string()
                .contains("no channel key")
        );
        let f = write(&format!(
            "link = \"{}\"\nupload = 0\noutput = \"http://127.0.0.1:0\"\nnode_key = \"peer.key\"\n",
            link()
        ));
        let p = play_from(&f);
        assert_eq!(p.upload_bps, Some(0));
        assert_eq!(p.upload_priority, UploadPriority::Low);
        assert!(matches!(p.output, Output::Http(_)));
        assert_eq!(p.node_key, Some(PathBuf::from("peer.key")));
        let f = write(&format!(
            "link = \"{}\"\nupload_priority = \"normal\"\n",
            link()
        ));
        assert_eq!(play_from(&f).upload_priority, UploadPriority::Normal);
    }

    #[test]
    fn a_broadcast_s_chunk_duration_comes_from_the_file_or_the_command_line_and_is_checked() {
        let base = || BroadcastArgs {
            key: Some("channel.key".into()),
            ..Default::default()
        };
        assert_eq!(base().resolve().unwrap().chunk, None, "by the input");
        let f = write("key = \"channel.key\"\nchunk_ms = 1000\n");
        let from_file = |chunk_ms| {
            BroadcastArgs {
                config: Some(f.path()),
                chunk_ms,
                ..Default::default()
            }
            .resolve()
        };
        assert_eq!(from_file(None).unwrap().chunk, Some(Duration::from_secs(1)));
        assert_eq!(
            from_file(Some(500)).unwrap().chunk,
            Some(Duration::from_millis(500))
        );
        for bad in [0, 99, 2001, 10_000] {
            let err = BroadcastArgs {
                chunk_ms: Some(bad),
                ..base()
            }
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with(&format!(
                    "chunk_ms must be 100 to 2000 (milliseconds), not {bad}"
                )),
                "{err}"
            );
        }
        for good in [100, 2000] {
            let ok = BroadcastArgs {
                chunk_ms: Some(good),
                ..base()
            };
            assert_eq!(
                ok.resolve().unwrap().chunk,
                Some(Duration::from_millis(good))
            );
        }
    }

    #[test]
    fn a_player_s_delay_comes_from_the_file_or_the_command_line_and_is_checked() {
        let f = write(&format!("link = \"{}\"\n", link()));
        assert_eq!(play_from(&f).delay, Duration::from_millis(1500));
        let f = write(&format!("link = \"{}\"\ndelay_ms = 3000\n", link()));
        assert_eq!(play_from(&f).delay, Duration::from_secs(3));
        let args = |delay_ms| PlayArgs {
            config: Some(f.path()),
            delay_ms: Some(delay_ms),
            ..Default::default()
        };
        assert_eq!(args(0).resolve().unwrap().delay, Duration::ZERO);
        assert_eq!(args(5000).resolve().unwrap().delay, Duration::from_secs(5));
        let err = args(5001).resolve().unwrap_err().to_string();
        assert!(
            err.starts_with("delay_ms must be at most 5000 (milliseconds), not 5001"),
            "{err}"
        );
    }

    /// The error of `relay` given a config file of `text` alone, and the file.
    fn relay_err(text: &str) -> (TempFile, String) {
        let f = write(text);
        let err = RelayArgs {
            config: Some(f.path()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        (f, err)
    }

    /// The error of `play` given a config file of `text` alone, and the file.
    fn play_err(text: &str) -> (TempFile, String) {
        let f = write(text);
        let err = PlayArgs {
            config: Some(f.path()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        (f, err)
    }

    /// `play` resolved from the config file `f` alone.
    fn play_from(f: &TempFile) -> PlayConfig {
        PlayArgs {
            config: Some(f.path()),
            ..Default::default()
        }
        .resolve()
        .unwrap()
    }
}
