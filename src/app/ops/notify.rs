//! systemd notification (`sd-notify`; nothing happens outside a `Type=notify` unit):
//! `READY=1` once the node serves, `STOPPING=1` when its drain starts, and, under
//! `WatchdogSec=`, `WATCHDOG=1` at half the interval only while every worker is live
//! ([`super::health::liveness`]), so that systemd restarts a node whose data plane is stuck
//! even though its process is still there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::driver::pulse::{Pulse, PulseReading};

/// Tells systemd the node is ready, with a status line.
pub fn ready(status: &str) {
    if let Err(err) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::debug!(%err, "sd_notify READY");
    }
}

/// Tells systemd the node is stopping (its drain has begun).
pub fn stopping() {
    if let Err(err) = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("draining")]) {
        tracing::debug!(%err, "sd_notify STOPPING");
    }
}

/// Starts the watchdog thread if systemd asked for one; it ends when `stop` is set.
pub fn watchdog(pulses: Vec<Arc<Pulse>>, stop: Arc<AtomicBool>) -> Option<JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let every = (interval / 2).max(Duration::from_millis(100));
    tracing::info!(?interval, "systemd watchdog on");
    std::thread::Builder::new()
        .name("gridcast-watchdog".into())
        .spawn(move || {
            let mut complained = false;
            while !stop.load(Ordering::Relaxed) {
                let readings: Vec<PulseReading> = pulses.iter().map(|p| p.read()).collect();
                #[allow(clippy::disallowed_methods)] // the watchdog compares with the clock
                let now = std::time::Instant::now();
                match super::health::liveness(&readings, now) {
                    Ok(()) => {
                        complained = false;
                        let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                    }
                    Err(why) if !complained => {
                        complained = true;
                        tracing::error!(%why, "not telling the watchdog: systemd will restart");
                    }
                    Err(_) => {}
                }
                // In slices, so that a stopping node is not held up by a long interval.
                let mut slept = Duration::ZERO;
                while slept < every && !stop.load(Ordering::Relaxed) {
                    let slice = (every - slept).min(Duration::from_millis(100));
                    std::thread::sleep(slice);
                    slept += slice;
                }
            }
        })
        .ok()
}
