//! The resilience bed: one network namespace per host, each with one interface (`eth0`, a TAP
//! device) plugged into the bed's switch ([`super::wire`]), which shapes every host's uplink
//! and downlink: delay, jitter, loss, a rate limit. A packet from host a to host b crosses a's
//! uplink and b's downlink, so a path's delay is the sum of the two and its loss about the sum
//! of both.
//!
//! Hosts are 10.79.0.<h+1>/24; two beds never meet, since each host sees only its own
//! namespace and its bed's switch. Everything the bed made goes when it is dropped, also when
//! a test fails: its processes are killed first, then its switch stopped (closing the TAP
//! devices removes them) and its namespaces deleted. A run killed outright leaves namespaces
//! named after its process id; the next bed deletes those of processes that no longer exist.
//!
//! Needs root, iproute2 and /dev/net/tun; [`Bed::can_run`] skips with a message where they are
//! missing, unless `GRIDCAST_REQUIRE_NETNS=1` (CI) makes that a failure.

#![allow(clippy::unwrap_used, clippy::print_stdout, unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub use super::wire::{PortCounts, Shape};
use super::wire::{Wire, tap};

/// The port every node of a bed listens on, each on its own host.
pub const PORT: u16 = 4433;

/// Prefix of every namespace a bed creates: `gcbed-<pid>-<n>-h<host>`.
const PREFIX: &str = "gcbed-";

/// Hosts in their own namespaces behind one shaped switch; see the module doc.
pub struct Bed {
    hosts: Vec<String>,
    children: Vec<Child>,
    wire: Option<Wire>,
}

/// Runs `ip args…`; whether it succeeded.
pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `ip args…` and panics, with its error output, if it fails.
fn must_ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Deletes the namespaces named `<prefix><pid>-…` whose process is gone (a run killed
/// before it cleaned up).
pub fn remove_stale(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            ip(&["netns", "del", name]);
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
        }
    }
}

/// Whether tests may make network namespaces here: root and `ip` (iproute2), and
/// /dev/net/tun if `tun`. When not, a failure if `GRIDCAST_REQUIRE_NETNS=1` (CI), else a skip
/// with a message.
pub fn can_use_netns(tun: bool) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let found = root && ip(&["-V"]) && (!tun || std::path::Path::new("/dev/net/tun").exists());
    if !found {
        assert!(
            !std::env::var("GRIDCAST_REQUIRE_NETNS").is_ok_and(|v| v == "1"),
            "network namespaces are required (GRIDCAST_REQUIRE_NETNS=1) but this is not root, \
             iproute2 is missing or (for the bed) there is no /dev/net/tun"
        );
        println!("not root, no iproute2 or no /dev/net/tun: skipping");
    }
    found
}

impl Bed {
    /// Whether beds can be made here (root, `ip`, /dev/net/tun); see [`can_use_netns`].
    pub fn can_run() -> bool {
        can_use_netns(true)
    }

    /// `hosts` hosts, every attachment shaped `up` from the host and `down` towards it.
    pub fn new(hosts: usize, up: Shape, down: Shape) -> Self {
        static BEDS: AtomicU32 = AtomicU32::new(0);
        assert!(hosts < 250, "a bed holds at most 249 hosts");
        remove_stale(PREFIX);
        let pid = std::process::id();
        let n = BEDS.fetch_add(1, Ordering::Relaxed);
        let mut bed = Self {
            hosts: Vec::new(),
            children: Vec::new(),
            wire: None,
        };
        let mut fds = Vec::new();
        for h in 0..hosts {
            let name = format!("{PREFIX}{pid}-{n}-h{h}");
            must_ip(&["netns", "add", &name]);
            bed.hosts.push(name.clone());
            // Made in this namespace under a name unique to this bed, then moved into the
            // host's and renamed there.
            let dev = format!("g{pid}x{n}t{h}");
            fds.push(tap(&dev));
            must_ip(&["link", "set", &dev, "netns", &name]);
            must_ip(&["-n", &name, "link", "set", &dev, "name", "eth0"]);
            let addr = format!("{}/24", bed.addr(h));
            must_ip(&["-n", &name, "addr", "add", &addr, "dev", "eth0"]);
            must_ip(&["-n", &name, "link", "set", "eth0", "up", "multicast", "on"]);
            must_ip(&["-n", &name, "link", "set", "lo", "up"]);
        }
        bed.wire = Some(Wire::start(
            fds,
            up,
            down,
            u64::from(pid) << 8 | u64::from(n),
        ));
        bed
    }

    /// Host `h`'s address.
    pub fn addr(&self, h: usize) -> String {
        format!("10.79.0.{}", h + 1)
    }

    fn wire(&self) -> &Wire {
        self.wire.as_ref().unwrap()
    }

    /// Gives host `h`'s attachment new shapes.
    pub fn reshape(&self, h: usize, up: Shape, down: Shape) {
        self.wire().reshape(h, up, down);
    }

    /// Cuts host `h` off: every frame to or from it is lost, as when its cable is pulled
    /// beyond its network card (its processes run on and see nothing wrong locally).
    pub fn cut(&self, h: usize) {
        self.wire().set_cut(h, true);
    }

    /// Puts host `h` back after [`Bed::cut`].
    pub fn mend(&self, h: usize) {
        self.wire().set_cut(h, false);
    }

    /// Puts host `h` behind a stateful firewall, as behind a home router (NAT or IPv6
    /// firewall): a UDP datagram reaches it only from an address and port it has sent to.
    pub fn firewall(&self, h: usize) {
        self.wire().set_firewall(h, true);
    }

    /// What the switch did so far, per host.
    pub fn counts(&self) -> Vec<PortCounts> {
        self.wire().counts()
    }

    /// `program args…` to run inside host `h`'s namespace (`ip netns exec` runs it in place,
    /// so the child is the program itself and signals reach it).
    pub fn command(&self, h: usize, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[h], program])
            .args(args);
        c
    }

    /// `gridcast args… --log-level warn` inside host `h`'s namespace.
    pub fn gridcast(&self, h: usize, args: &[&str]) -> Command {
        let mut c = self.command(h, env!("CARGO_BIN_EXE_gridcast"), args);
        c.args([
            "--log-level",
            &std::env::var("GRIDCAST_BED_LOG").unwrap_or_else(|_| "warn".into()),
        ]);
        c
    }

    /// Runs `f` on a new thread of the test process inside host `h`'s network namespace
    /// (`setns` moves that thread only): sockets it opens are the host's. `None` if the
    /// namespace cannot be entered.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        h: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Option<T>> {
        let ns = format!("/run/netns/{}", self.hosts[h]);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&ns).ok()?;
            // SAFETY: a namespace file this thread holds open; setns changes only the
            // calling thread's network namespace, and the thread ends after `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            Some(f())
        })
    }

    /// `GET path` on `addr` from inside host `h` (a node's admin listener there), as
    /// [`super::http::get`], on a thread of [`Bed::spawn_in`].
    pub fn get(&self, h: usize, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
        let path = path.to_owned();
        self.spawn_in(h, move || super::http::get(addr, &path))
            .join()
            .ok()
            .flatten()
            .flatten()
    }

    /// A scrape of `/metrics` from the admin listener of the relay on host `h` (its default,
    /// 127.0.0.1:9464 inside the host); `None` until it answers 200.
    pub fn metrics(&self, h: usize) -> Option<String> {
        let admin: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        self.get(h, admin, "/metrics")
            .and_then(|(code, body)| (code == 200).then_some(body))
    }

    /// Gives host `h` an IPv6 address too, `2001:db8:79::<h+1>/64` on its interface (the
    /// documentation prefix; it never leaves the bed), usable at once (no duplicate address
    /// detection), and returns it.
    pub fn add_ipv6(&self, h: usize) -> String {
        let addr = format!("2001:db8:79::{:x}", h + 1);
        let with_len = format!("{addr}/64");
        must_ip(&[
            "-n",
            &self.hosts[h],
            "addr",
            "add",
            &with_len,
            "dev",
            "eth0",
            "nodad",
        ]);
        addr
    }

    /// Runs `ip args…` in host `h`'s namespace; panics with its error output if it fails.
    pub fn ip_in(&self, h: usize, args: &[&str]) {
        let mut all = vec!["-n", self.hosts[h].as_str()];
        all.extend_from_slice(args);
        must_ip(&all);
    }

    /// Host `h`'s own `/etc/hosts`, for the programs the bed runs there (`ip netns exec`
    /// puts `/etc/netns/<namespace>/hosts` in place of the machine's); removed with the bed.
    pub fn hosts_file(&self, h: usize, text: &str) {
        let dir = Path::new("/etc/netns").join(&self.hosts[h]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), text).unwrap();
    }

    /// A paced broadcast on host `h`, for tests that need no media: `bytes` pseudo-random
    /// bytes ([`super::procs::Noise`] from `seed`) written to a file in `dir`. `broadcast`
    /// reads the file at 2 Mbit/s and serves the last chunk for 3 s after its end; the bed
    /// keeps the process. Returns the input, and the source's link with its host's address.
    pub fn paced_source(
        &mut self,
        h: usize,
        dir: &Path,
        seed: u64,
        bytes: usize,
    ) -> (Vec<u8>, String) {
        self.paced_source_with(h, dir, seed, bytes, &[])
    }

    /// [`Bed::paced_source`] with more options.
    pub fn paced_source_with(
        &mut self,
        h: usize,
        dir: &Path,
        seed: u64,
        bytes: usize,
        more: &[&str],
    ) -> (Vec<u8>, String) {
        use super::procs::{Noise, keygen, spawn_with_link, with_host};
        let key = keygen(dir);
        let reference = Noise::new(seed).bytes(bytes);
        let input = dir.join("input.bin");
        std::fs::write(&input, &reference).unwrap();
        let mut args = vec![
            "broadcast",
            "--key",
            key.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--rate",
            "2M",
            "--linger",
            "3",
        ];
        args.extend_from_slice(more);
        let (source, printed) = spawn_with_link(self.gridcast(h, &args));
        self.keep(source);
        let link = with_host(&printed, &self.addr(h));
        (reference, link)
    }

    /// A `relay` on host `h` joining `link`, on its defaults, kept by the bed; its printed
    /// channel link.
    pub fn relay(&mut self, h: usize, link: &str) -> String {
        self.relay_with(h, link, &[])
    }

    /// [`Bed::relay`] with more options.
    pub fn relay_with(&mut self, h: usize, link: &str, more: &[&str]) -> String {
        let mut args = vec!["relay", "--join", link];
        args.extend_from_slice(more);
        let (relay, printed) = super::procs::spawn_with_link(self.gridcast(h, &args));
        self.keep(relay);
        printed
    }

    /// A `play` on host `h` of `link` into the file `out`, kept by the bed; its index.
    pub fn player(&mut self, h: usize, link: &str, out: &Path) -> usize {
        self.player_with(h, link, out, &[])
    }

    /// [`Bed::player`] with more options.
    pub fn player_with(&mut self, h: usize, link: &str, out: &Path, more: &[&str]) -> usize {
        let mut args = vec!["play", link, "--output", out.to_str().unwrap()];
        args.extend_from_slice(more);
        let child = self.gridcast(h, &args).spawn().unwrap();
        self.keep(child)
    }

    /// Moves host `h` to the IPv4 address `to` (in the bed's /24), as a new lease does: the
    /// new address is added, then the old one removed. Without `promote_secondaries`,
    /// removing the first address of a subnet would remove every later one with it, and the
    /// host would be left with no IPv4 address at all. Checks the host's addresses after.
    pub fn renumber(&self, h: usize, to: &str) {
        let status = self
            .command(
                h,
                "sysctl",
                &["-qw", "net.ipv4.conf.eth0.promote_secondaries=1"],
            )
            .status()
            .unwrap();
        assert!(status.success(), "sysctl promote_secondaries on host {h}");
        self.ip_in(h, &["addr", "add", &format!("{to}/24"), "dev", "eth0"]);
        let old = format!("{}/24", self.addr(h));
        self.ip_in(h, &["addr", "del", &old, "dev", "eth0"]);
        let shown = self
            .command(h, "ip", &["-4", "-o", "addr", "show", "dev", "eth0"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
        assert!(
            shown.contains(&format!("{to}/")) && !shown.contains(&old),
            "host {h} was not renumbered: {shown}"
        );
    }

    /// Waits for kept process `i` to exit, calling `each` every 250 ms meanwhile (a test's
    /// scrape); panics if it still runs after `limit`.
    pub fn wait_for(
        &mut self,
        i: usize,
        limit: std::time::Duration,
        mut each: impl FnMut(&Bed),
    ) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            each(self);
            if let Some(status) = self.children[i].try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "process {i} of the bed still runs after {limit:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    /// Keeps `child` to be killed when the bed goes; its index for [`Bed::child`].
    pub fn keep(&mut self, child: Child) -> usize {
        self.children.push(child);
        self.children.len() - 1
    }

    /// A process the bed keeps.
    pub fn child(&mut self, i: usize) -> &mut Child {
        &mut self.children[i]
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        drop(self.wire.take());
        for name in &self.hosts {
            ip(&["netns", "del", name]);
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
        }
    }
}

/// A `relay` on a host of the bed, killed when dropped.
pub struct Relay {
    pub child: Child,
    /// Its channel link.
    pub link: String,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a one-worker `relay` on host `h` joining `source_link`, its node key in `key`
/// (created if missing, so that a restart keeps the node id), listening on [`PORT`].
pub fn start_relay(bed: &Bed, h: usize, source_link: &str, key: &Path) -> Relay {
    let listen = format!("{}:{PORT}", bed.addr(h));
    let (child, link) = super::procs::spawn_with_link(bed.gridcast(
        h,
        &[
            "relay",
            "--join",
            source_link,
            "--listen",
            &listen,
            "--workers",
            "1",
            "--node-key",
            key.to_str().unwrap(),
            "--drain-timeout",
            "20",
        ],
    ));
    Relay { child, link }
}
