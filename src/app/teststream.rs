//! A built-in live test stream: MPEG-TS with a video PID whose random-access points come once a
//! second (keyframes) and an audio PID, every payload byte a function of its position so a
//! misplaced byte anywhere shows. No external tools: the demo feeds it to a source.

/// An MPEG-TS packet's length.
pub const TS_PACKET: usize = 188;

const VIDEO_PID: u16 = 0x100;
const AUDIO_PID: u16 = 0x101;

/// Generates the stream packet by packet.
#[derive(Debug, Clone)]
pub struct TestStream {
    packets_per_second: u64,
    sent: u64,
    video_cc: u8,
    audio_cc: u8,
}

impl TestStream {
    /// A stream of `bitrate_bps` (rounded to whole packets per second).
    pub fn new(bitrate_bps: u64) -> Self {
        Self {
            packets_per_second: (bitrate_bps / 8 / TS_PACKET as u64).max(10),
            sent: 0,
            video_cc: 0,
            audio_cc: 0,
        }
    }

    /// Packets due by `elapsed_us` of stream time, appended to `out`.
    pub fn fill_until(&mut self, elapsed_us: u64, out: &mut Vec<u8>) {
        let due = elapsed_us * self.packets_per_second / 1_000_000;
        while self.sent < due {
            self.packet(out);
        }
    }

    /// Bytes generated so far.
    pub fn bytes(&self) -> u64 {
        self.sent * TS_PACKET as u64
    }

    fn packet(&mut self, out: &mut Vec<u8>) {
        let n = self.sent;
        // One packet in ten is audio; a video keyframe starts every second.
        let audio = n % 10 == 9;
        let keyframe = !audio && n.is_multiple_of(self.packets_per_second);
        let (pid, cc) = if audio {
            (AUDIO_PID, &mut self.audio_cc)
        } else {
            (VIDEO_PID, &mut self.video_cc)
        };
        let start = out.len();
        out.push(0x47);
        let pusi = if keyframe || audio { 0x40 } else { 0 };
        out.push(pusi | (pid >> 8) as u8);
        out.push(pid as u8);
        if keyframe || audio {
            // Adaptation field with random_access_indicator, then payload.
            out.push(0x30 | *cc);
            out.push(1);
            out.push(0x40);
        } else {
            out.push(0x10 | *cc);
        }
        *cc = (*cc + 1) & 0x0f;
        let offset = n * TS_PACKET as u64;
        while out.len() - start < TS_PACKET {
            let i = offset + (out.len() - start) as u64;
            out.push((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8);
        }
        self.sent += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_aligned_sync_bytes_at_the_bitrate() {
        let mut s = TestStream::new(1_000_000);
        let mut out = Vec::new();
        s.fill_until(1_000_000, &mut out);
        assert_eq!(out.len() % TS_PACKET, 0);
        assert_eq!(out.len() as u64, s.bytes());
        // 1 Mbit/s is 664 packets of 188 bytes.
        assert_eq!(out.len() / TS_PACKET, 664);
        assert!(out.chunks(TS_PACKET).all(|p| p[0] == 0x47));
        let keyframes = out
            .chunks(TS_PACKET)
            .filter(|p| p[1] & 0x1f == 0x01 && p[2] == 0x00 && p[3] & 0x20 != 0)
            .count();
        assert_eq!(keyframes, 1);
    }
}
