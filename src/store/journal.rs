//! The embedded store's journal: where a batch becomes durable.
//!
//! sled makes its own writes durable with `flush()` (a `pwrite` and a
//! `sync_file_range` that waits for the device) and then needs an fsync of
//! its data file on top: two device round trips per group commit. Here the
//! writer thread appends each group's changes as one frame to a journal
//! file and makes it durable with one `fdatasync` *before* it writes them
//! into sled. sled is flushed lazily, as an index: when a journal file is
//! full the writer moves to the other one and a *checkpoint* (sled's
//! `flush` and an fsync of its data file) runs beside it; the full file is written over
//! only once that checkpoint has finished, so every frame in it is then in
//! sled's durable state.
//!
//! sled never holds a change whose frame is not durable, so whatever part
//! of a group sled keeps after a crash — a SIGKILL loses what sled had not
//! written out; a power cut may keep any prefix of its log — its frame is
//! there to complete it. At open, sled recovers first, then every frame
//! whose group number is above the last group sled holds whole is written
//! again, in order. A frame holds the group's final values (puts and
//! removals), so writing one again over a part of itself is harmless.
//!
//! Frame: `PCJ1`, group number (u64), payload length (u32), CRC-32 of the
//! store's id (16 random bytes in sled's `meta/store_id`), the number, the
//! length and the payload (u32), all big-endian, then the payload. A frame
//! of another store does not read here: a data directory put together
//! from two stores replays nothing of the other.
//! Reading a file stops at the first frame that is torn, fails its CRC, or
//! does not follow the one before it (what is left of an earlier round
//! through the file): its group numbers are smaller.
//!
//! Files are grown a megabyte of zeros at a time, so most syncs change
//! data only, not the file's size (which would cost a journal commit of
//! the file system on top).
//!
//! [`Store::sync`]: super::Store::sync

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::sync::Arc;

use super::StoreError;

const MAGIC: &[u8; 4] = b"PCJ1";
const HEADER: usize = 4 + 8 + 4 + 4;
/// The writer moves to the other file once this one holds this much.
const SWITCH_AT: u64 = 16 << 20;
/// Files grow by this many zeros at a time.
const GROW_BY: u64 = 1 << 20;
/// Frames of up to this many bytes of changes are written in one call.
const COPY_UP_TO: usize = 256 << 10;
/// The journal's files, under the store's directory.
pub(super) const FILES: [&str; 2] = ["journal-0", "journal-1"];

/// Makes everything written to sled so far durable in sled itself.
pub(super) type Checkpoint = Arc<dyn Fn() -> Result<(), StoreError> + Send + Sync>;

/// The writer's side of the journal.
pub(super) struct Journal {
    id: StoreId,
    files: [Arc<File>; 2],
    current: usize,
    /// Where the next frame goes in the current file.
    offset: u64,
    /// Bytes each file holds (zeros past the frames).
    allocated: [u64; 2],
    checkpoint: Checkpoint,
    /// The checkpoint that frees the other file, while it runs.
    running: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
}

/// A frame read back: group number and payload.
pub(super) type Frame = (u64, Vec<u8>);

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("journal: {e}"))
}

/// The id that ties frames to their store.
pub(super) type StoreId = [u8; 16];

/// `id`: `None` for frames written before frames were tied to their store.
fn crc(id: Option<&StoreId>, seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if let Some(id) = id {
        h.update(id);
    }
    h.update(&seq.to_be_bytes());
    h.update(&(payload.len() as u32).to_be_bytes());
    h.update(payload);
    h.finalize()
}

/// Group `seq`'s frame (`size`: the payload's length).
pub(super) fn frame(id: Option<&StoreId>, seq: u64, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    frame.extend_from_slice(&header(id, seq, size, payload));
    frame.extend_from_slice(payload);
    frame
}

/// The header of group `seq`'s frame.
fn header(id: Option<&StoreId>, seq: u64, size: u32, payload: &[u8]) -> [u8; HEADER] {
    let (seq, size, crc) = (
        seq.to_be_bytes(),
        size.to_be_bytes(),
        crc(id, seq, payload).to_be_bytes(),
    );
    let mut h = [0; HEADER];
    for (to, from) in h
        .iter_mut()
        .zip(MAGIC.iter().chain(&seq).chain(&size).chain(&crc))
    {
        *to = *from;
    }
    h
}

/// The frames of one file, from its start up to the first that does not
/// read whole or does not follow the one before it.
fn frames_of(id: Option<&StoreId>, bytes: &[u8]) -> Vec<Frame> {
    let mut out: Vec<Frame> = Vec::new();
    let mut at = 0usize;
    while let Some(head) = bytes.get(at..at + HEADER) {
        let (magic, rest) = head.split_at(4);
        let (seq, rest) = rest.split_at(8);
        let (len, sum) = rest.split_at(4);
        let seq = u64::from_be_bytes(seq.try_into().unwrap_or_default());
        let len = u32::from_be_bytes(len.try_into().unwrap_or_default()) as usize;
        let sum = u32::from_be_bytes(sum.try_into().unwrap_or_default());
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        let follows = out
            .last()
            .is_none_or(|(prev, _)| prev.checked_add(1) == Some(seq));
        if magic != MAGIC || crc(id, seq, payload) != sum || !follows {
            break;
        }
        out.push((seq, payload.to_vec()));
        at += HEADER + len;
    }
    out
}

impl Journal {
    /// Open (or create) the journal under `dir`, and the frames it holds
    /// after group `after`, in order. Frames there must follow on from
    /// `after` with no gap: an acknowledged group is never skipped, so a
    /// journal that would skip one is refused.
    pub(super) fn open(
        dir: &Path,
        id: StoreId,
        checkpoint: Checkpoint,
    ) -> Result<(Self, Vec<Frame>), StoreError> {
        let mut files = Vec::with_capacity(2);
        let mut frames = Vec::new();
        let mut allocated = [0u64; 2];
        for (i, name) in FILES.iter().enumerate() {
            let path = dir.join(name);
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(unavailable)?;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map_err(unavailable)?;
            allocated[i] = bytes.len() as u64;
            frames.extend(frames_of(Some(&id), &bytes));
            files.push(Arc::new(f));
        }
        // A frame in a file whose name a crash forgot is lost: the names
        // are made durable at every open (a crash may have come between
        // creating them and syncing their directory).
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(unavailable)?;
        frames.sort_by_key(|f| f.0);
        let files: [Arc<File>; 2] = files
            .try_into()
            .map_err(|_| unavailable("two files expected"))?;
        let journal = Self {
            id,
            files,
            current: 0,
            offset: 0,
            allocated,
            checkpoint,
            running: None,
        };
        // The writer starts at the first file's start: written over only
        // after the caller has written these frames into sled and
        // checkpointed it (see `SledStore::open_with`).
        Ok((journal, frames))
    }

    /// The frames under `dir` as builds before the store's id wrote them
    /// (schema 5), in order: read once, at the open that gives the store
    /// its id, so that none of them is lost.
    pub(super) fn untied_frames(dir: &Path) -> Result<Vec<Frame>, StoreError> {
        let mut frames = Vec::new();
        for name in FILES {
            match std::fs::read(dir.join(name)) {
                Ok(bytes) => frames.extend(frames_of(None, &bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        frames.sort_by_key(|f| f.0);
        Ok(frames)
    }

    /// The frames of `all` after group `after`, checked to follow on from
    /// it without a gap.
    pub(super) fn after(all: Vec<Frame>, after: u64) -> Result<Vec<Frame>, StoreError> {
        let mut out: Vec<Frame> = Vec::new();
        for (seq, payload) in all {
            if seq <= after {
                continue;
            }
            let expected = out.last().map_or(after, |f| f.0).saturating_add(1);
            if seq != expected {
                return Err(StoreError::Corrupt {
                    tree: "journal",
                    key: seq.to_string(),
                    detail: format!(
                        "group {seq} follows group {}: the journal misses a group the store \
                         acknowledged",
                        expected - 1
                    ),
                });
            }
            out.push((seq, payload));
        }
        Ok(out)
    }

    /// Append group `seq`'s changes and make them durable.
    pub(super) fn append(&mut self, seq: u64, payload: &[u8]) -> Result<(), StoreError> {
        self.write(seq, payload)?;
        self.files[self.current].sync_data().map_err(unavailable)
    }

    /// Append group `seq`'s changes, not yet durable.
    fn write(&mut self, seq: u64, payload: &[u8]) -> Result<(), StoreError> {
        let size = u32::try_from(payload.len())
            .map_err(|_| unavailable("a group of more than 4 GiB of changes"))?;
        let len = (HEADER + payload.len()) as u64;
        if self.offset > 0 && self.offset + len > SWITCH_AT {
            self.switch()?;
        }
        let need = self.offset + len;
        if need > self.allocated[self.current] {
            // Zeros written, not a hole left by `set_len`: writing into a
            // hole allocates blocks, which a data-only sync would not cover.
            // From one static page of zeros: a fresh megabyte each time
            // cost the writer a page fault and a clearing per page.
            static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
            let from = self.allocated[self.current];
            let to = need.div_ceil(GROW_BY) * GROW_BY;
            let mut f = &*self.files[self.current];
            f.seek(SeekFrom::Start(from)).map_err(unavailable)?;
            let mut left = to - from;
            while left > 0 {
                let n = left.min(ZEROS.len() as u64);
                f.write_all(&ZEROS[..n as usize]).map_err(unavailable)?;
                left -= n;
            }
            self.allocated[self.current] = to;
        }
        let mut f = &*self.files[self.current];
        f.seek(SeekFrom::Start(self.offset)).map_err(unavailable)?;
        if payload.len() <= COPY_UP_TO {
            f.write_all(&frame(Some(&self.id), seq, size, payload))
        } else {
            // Not copied: a bulk revocation's group is tens of megabytes.
            f.write_all(&header(Some(&self.id), seq, size, payload))
                .and_then(|()| f.write_all(payload))
        }
        .map_err(unavailable)?;
        self.offset = need;
        Ok(())
    }

    /// Leave the current file for the other: wait until the checkpoint
    /// that frees the other has finished, start the one that frees this.
    fn switch(&mut self) -> Result<(), StoreError> {
        self.wait_for_checkpoint()?;
        let checkpoint = self.checkpoint.clone();
        self.running = Some(
            std::thread::Builder::new()
                .name("portcullis-sled-checkpoint".into())
                .spawn(move || checkpoint())
                .map_err(unavailable)?,
        );
        self.current = 1 - self.current;
        self.offset = 0;
        Ok(())
    }

    fn wait_for_checkpoint(&mut self) -> Result<(), StoreError> {
        match self.running.take() {
            Some(t) => t
                .join()
                .map_err(|_| unavailable("the checkpoint thread panicked"))?,
            None => Ok(()),
        }
    }

    /// At close: sled holds everything durably, so no frame is needed again.
    pub(super) fn close(&mut self) -> Result<(), StoreError> {
        self.wait_for_checkpoint()?;
        (self.checkpoint)()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: StoreId = [7; 16];

    /// Frames written for one store do not read as another's.
    #[test]
    fn another_stores_frames_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, _) = counting();
        let (mut j, _) = Journal::open(dir.path(), ID, cp.clone()).unwrap();
        j.append(1, b"group 1").unwrap();
        drop(j);
        let (_, frames) = Journal::open(dir.path(), [8; 16], cp.clone()).unwrap();
        assert!(frames.is_empty());
        let (_, frames) = Journal::open(dir.path(), ID, cp).unwrap();
        assert_eq!(frames.len(), 1);
    }

    fn counting() -> (Checkpoint, Arc<std::sync::atomic::AtomicUsize>) {
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let m = n.clone();
        (
            Arc::new(move || {
                m.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }),
            n,
        )
    }

    #[test]
    fn frames_come_back_in_order_after_the_last_group_held() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, _) = counting();
        let (mut j, frames) = Journal::open(dir.path(), ID, cp.clone()).unwrap();
        assert!(frames.is_empty());
        for seq in 1..=5u64 {
            j.append(seq, format!("group {seq}").as_bytes()).unwrap();
        }
        drop(j);
        let (_, frames) = Journal::open(dir.path(), ID, cp).unwrap();
        let after = Journal::after(frames, 2).unwrap();
        let seqs: Vec<u64> = after.iter().map(|f| f.0).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert_eq!(after[0].1, b"group 3");
    }

    #[test]
    fn a_torn_or_altered_frame_ends_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, _) = counting();
        let (mut j, _) = Journal::open(dir.path(), ID, cp.clone()).unwrap();
        for seq in 1..=3u64 {
            j.append(seq, &[seq as u8; 100]).unwrap();
        }
        drop(j);
        // Flip one byte of the second frame's payload.
        let path = dir.path().join(FILES[0]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 100 + HEADER + 50] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (_, frames) = Journal::open(dir.path(), ID, cp).unwrap();
        assert_eq!(frames.len(), 1, "only the frame before the altered one");
    }

    #[test]
    fn a_gap_after_the_last_group_held_is_refused() {
        let frames = vec![(4, vec![]), (6, vec![])];
        assert!(matches!(
            Journal::after(frames.clone(), 3),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(
            matches!(Journal::after(frames, 1), Err(StoreError::Corrupt { .. })),
            "a first frame that does not follow the last group held"
        );
        assert_eq!(Journal::after(vec![(2, vec![])], 5).unwrap(), vec![]);
    }

    /// Past a file's worth the writer moves to the other file, checkpoints
    /// before it writes over a file, and reading both gives every frame the
    /// last checkpoint did not cover, whatever was left in the files from
    /// earlier rounds.
    #[test]
    fn the_files_are_used_in_turn_and_old_rounds_are_not_read_as_new() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, checkpoints) = counting();
        let (mut j, _) = Journal::open(dir.path(), ID, cp.clone()).unwrap();
        let payload = vec![7u8; 1 << 20];
        let per_file = SWITCH_AT / (HEADER as u64 + (1 << 20));
        let total = per_file * 5 + 3;
        for seq in 1..=total {
            j.write(seq, &payload).unwrap();
        }
        j.wait_for_checkpoint().unwrap();
        let switches = checkpoints.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(switches, 5);
        drop(j);
        let (_, frames) = Journal::open(dir.path(), ID, cp).unwrap();
        // The last checkpoint covered everything before the last switch.
        let covered = per_file * 5;
        let after = Journal::after(frames, covered).unwrap();
        let seqs: Vec<u64> = after.iter().map(|f| f.0).collect();
        assert_eq!(seqs, ((covered + 1)..=total).collect::<Vec<_>>());
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let len = f.unwrap().metadata().unwrap().len();
            assert!(len <= SWITCH_AT + GROW_BY, "a file grew to {len}");
        }
    }
}
