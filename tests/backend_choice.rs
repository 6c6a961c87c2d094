//! Choosing the data plane. The refusal is real: a seccomp filter on this test's thread makes
//! `io_uring_setup` fail with EPERM, exactly as Docker's default profile does, and the node
//! must come up on the portable backend (auto) or refuse clearly (forced io_uring).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, unsafe_code)]

use std::io;
use std::sync::mpsc;
use std::thread;

use gridcast::driver::{Chosen, IoBackend, Node, choose};
use gridcast::keys::NodeKey;
use gridcast::node::{Engine, EngineConfig};

/// Installs, on the calling thread only, a seccomp filter that fails `io_uring_setup` with
/// EPERM and allows everything else.
fn refuse_io_uring_on_this_thread() -> io::Result<()> {
    // io_uring_setup is 425 in the unified syscall table every architecture uses for it.
    const NR_IO_URING_SETUP: u32 = 425;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let program = [
        // A = seccomp_data.nr
        op(0x20, 0, 0, 0),
        // if A == io_uring_setup fall through, else skip one
        op(0x15, 0, 1, NR_IO_URING_SETUP),
        op(0x06, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        op(0x06, 0, 0, SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl calls; `prog` points at `program`, alive for the call (the kernel
    // copies it). Without a TSYNC flag the filter binds this thread only.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &raw const prog,
            0,
            0,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn a_refused_io_uring_falls_back_to_portable_or_fails_clearly_when_forced() {
    thread::spawn(|| {
        refuse_io_uring_on_this_thread().unwrap();
        assert_eq!(choose(IoBackend::Auto).unwrap(), Chosen::Portable);
        let forced = choose(IoBackend::Uring).unwrap_err();
        assert_eq!(forced.raw_os_error(), None);
        let msg = forced.to_string();
        assert!(
            msg.contains("io_uring backend requested but unavailable"),
            "{msg}"
        );
        assert!(msg.contains("not permitted"), "{msg}");

        // A whole node started on auto runs, on the portable backend.
        let key = NodeKey::from_seed(&[3; 32]);
        let (tx, _events) = mpsc::channel();
        let node = Node::start(
            IoBackend::Auto,
            "127.0.0.1:0".parse().unwrap(),
            2,
            |_| Engine::new(&key, EngineConfig::default()),
            &tx,
        )
        .unwrap();
        assert_eq!(node.backend(), Chosen::Portable);
        assert_eq!(node.workers(), 1);
        node.stop().unwrap();
    })
    .join()
    .unwrap();
}

#[test]
fn forcing_portable_runs_one_portable_engine() {
    let key = NodeKey::from_seed(&[4; 32]);
    let (tx, _events) = mpsc::channel();
    let node = Node::start(
        IoBackend::Portable,
        "127.0.0.1:0".parse().unwrap(),
        4,
        |_| Engine::new(&key, EngineConfig::default()),
        &tx,
    )
    .unwrap();
    assert_eq!(node.backend(), Chosen::Portable);
    node.stop().unwrap();
}

/// An idle portable node sleeps until there is something to do, and a command wakes it: it
/// used to look for commands every 5 ms, 200 wake-ups a second with nothing to do. On an
/// IPv4 address and on the dual-stack wildcard.
#[test]
fn an_idle_portable_node_sleeps_until_a_command_wakes_it() {
    let key = NodeKey::from_seed(&[5; 32]);
    for addr in ["127.0.0.1:0", "[::]:0"] {
        let (tx, _events) = mpsc::channel();
        let node = Node::start(
            IoBackend::Portable,
            addr.parse().unwrap(),
            1,
            |_| Engine::new(&key, EngineConfig::default()),
            &tx,
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_secs(2));
        let turns = node.pulses()[0].read().stats.turns;
        assert!(
            turns <= 40,
            "{addr}: an idle node turned {turns} times in 2 s"
        );
        let (done_tx, done) = mpsc::channel();
        assert!(node.command(
            0,
            Box::new(move |_, _| {
                let _ = done_tx.send(());
            })
        ));
        done.recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        // The command's own wake-up, as the pulse publishes it (at a later turn); stopping
        // wakes the driver too, so the count after `stop` would not tell.
        let woken = (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            node.pulses()[0].read().stats.wakes >= 1
        });
        assert!(woken, "{addr}: the command did not wake the driver");
        let (_, stats) = node.stop().unwrap().pop().unwrap();
        assert_eq!(
            stats.datagrams_in, 0,
            "{addr}: a wake-up reached the engine as a datagram"
        );
    }
}

#[test]
fn backend_names_parse_and_bad_ones_are_named() {
    assert_eq!("auto".parse::<IoBackend>().unwrap(), IoBackend::Auto);
    assert_eq!("uring".parse::<IoBackend>().unwrap(), IoBackend::Uring);
    assert_eq!(
        "portable".parse::<IoBackend>().unwrap(),
        IoBackend::Portable
    );
    let err = "epoll".parse::<IoBackend>().unwrap_err();
    assert!(err.contains("\"epoll\""), "{err}");
}
