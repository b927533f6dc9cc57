//! Sparse offset and time indexes of one segment, in Kafka's on-disk entry formats.
//!
//! Offset index entries are 8 bytes: relative offset (u32) and byte position (u32).
//! Time index entries are 12 bytes: timestamp (i64) and relative offset (u32).
//! Both are kept in memory as sorted vectors and appended to their files; lookups are binary
//! searches for the largest entry not above the wanted key. The files are not fsynced on every
//! append: recovery rebuilds the active segment's indexes from the log, which is the truth.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// One offset index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

/// One time index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeEntry {
    pub timestamp: i64,
    pub relative_offset: u32,
}

/// The offset index: sparse, strictly increasing in both fields.
#[derive(Debug)]
pub struct OffsetIndex {
    path: PathBuf,
    file: File,
    entries: Vec<OffsetEntry>,
}

/// The time index: sparse, strictly increasing timestamps.
#[derive(Debug)]
pub struct TimeIndex {
    path: PathBuf,
    file: File,
    entries: Vec<TimeEntry>,
}

fn open_rw(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)
}

fn read_all(path: &Path) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut buf)?;
            Ok(buf)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(buf),
        Err(e) => Err(e),
    }
}

impl OffsetIndex {
    /// A new, empty index (truncating any file at `path`).
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(OffsetIndex {
            path: path.to_path_buf(),
            file: open_rw(path, true)?,
            entries: Vec::new(),
        })
    }

    /// Load an index from its file. Returns `None` when the file is missing or not a valid
    /// index (wrong size, entries not increasing, or a position at or past `log_size`): the
    /// caller rebuilds it.
    pub fn load(path: &Path, log_size: u64) -> io::Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let raw = read_all(path)?;
        if raw.len() % 8 != 0 {
            return Ok(None);
        }
        let mut entries = Vec::with_capacity(raw.len() / 8);
        for c in raw.chunks_exact(8) {
            let e = OffsetEntry {
                relative_offset: u32::from_be_bytes(c[0..4].try_into().expect("4")),
                position: u32::from_be_bytes(c[4..8].try_into().expect("4")),
            };
            if let Some(last) = entries.last() {
                let last: &OffsetEntry = last;
                if e.relative_offset <= last.relative_offset || e.position <= last.position {
                    return Ok(None);
                }
            }
            if e.position as u64 >= log_size {
                return Ok(None);
            }
            entries.push(e);
        }
        Ok(Some(OffsetIndex {
            path: path.to_path_buf(),
            file: open_rw(path, false)?,
            entries,
        }))
    }

    pub fn append(&mut self, relative_offset: u32, position: u32) -> io::Result<()> {
        if let Some(last) = self.entries.last() {
            assert!(
                relative_offset > last.relative_offset && position > last.position,
                "offset index entries must strictly increase"
            );
        }
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&relative_offset.to_be_bytes());
        b[4..8].copy_from_slice(&position.to_be_bytes());
        // Appended at the end: the file is opened without O_APPEND, so seek explicitly.
        use std::io::Seek;
        self.file
            .seek(io::SeekFrom::Start(self.entries.len() as u64 * 8))?;
        self.file.write_all(&b)?;
        self.entries.push(OffsetEntry {
            relative_offset,
            position,
        });
        Ok(())
    }

    /// The largest entry whose relative offset is not above `relative_offset`.
    pub fn lookup(&self, relative_offset: u32) -> Option<OffsetEntry> {
        let i = self
            .entries
            .partition_point(|e| e.relative_offset <= relative_offset);
        if i == 0 {
            None
        } else {
            Some(self.entries[i - 1])
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl TimeIndex {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(TimeIndex {
            path: path.to_path_buf(),
            file: open_rw(path, true)?,
            entries: Vec::new(),
        })
    }

    /// Load from file; `None` when missing or invalid (see [`OffsetIndex::load`]).
    pub fn load(path: &Path, max_relative_offset: Option<u32>) -> io::Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let raw = read_all(path)?;
        if raw.len() % 12 != 0 {
            return Ok(None);
        }
        let mut entries: Vec<TimeEntry> = Vec::with_capacity(raw.len() / 12);
        for c in raw.chunks_exact(12) {
            let e = TimeEntry {
                timestamp: i64::from_be_bytes(c[0..8].try_into().expect("8")),
                relative_offset: u32::from_be_bytes(c[8..12].try_into().expect("4")),
            };
            if let Some(last) = entries.last() {
                if e.timestamp <= last.timestamp || e.relative_offset < last.relative_offset {
                    return Ok(None);
                }
            }
            match max_relative_offset {
                Some(m) if e.relative_offset > m => return Ok(None),
                None => return Ok(None),
                _ => {}
            }
            entries.push(e);
        }
        Ok(Some(TimeIndex {
            path: path.to_path_buf(),
            file: open_rw(path, false)?,
            entries,
        }))
    }

    /// Record that the segment's max timestamp so far is `timestamp`, reached at or before
    /// `relative_offset`. Entries only grow.
    pub fn maybe_append(&mut self, timestamp: i64, relative_offset: u32) -> io::Result<()> {
        if let Some(last) = self.entries.last() {
            if timestamp <= last.timestamp {
                return Ok(());
            }
            assert!(relative_offset >= last.relative_offset);
        }
        let mut b = [0u8; 12];
        b[0..8].copy_from_slice(&timestamp.to_be_bytes());
        b[8..12].copy_from_slice(&relative_offset.to_be_bytes());
        use std::io::Seek;
        self.file
            .seek(io::SeekFrom::Start(self.entries.len() as u64 * 12))?;
        self.file.write_all(&b)?;
        self.entries.push(TimeEntry {
            timestamp,
            relative_offset,
        });
        Ok(())
    }

    /// The largest entry whose timestamp is not above `timestamp`.
    pub fn lookup(&self, timestamp: i64) -> Option<TimeEntry> {
        let i = self.entries.partition_point(|e| e.timestamp <= timestamp);
        if i == 0 {
            None
        } else {
            Some(self.entries[i - 1])
        }
    }

    pub fn last(&self) -> Option<TimeEntry> {
        self.entries.last().copied()
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_index_lookup_is_floor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.index");
        let mut idx = OffsetIndex::create(&p).unwrap();
        idx.append(0, 0).unwrap();
        idx.append(10, 4096).unwrap();
        idx.append(20, 8192).unwrap();
        assert_eq!(idx.lookup(5).unwrap().position, 0);
        assert_eq!(idx.lookup(10).unwrap().position, 4096);
        assert_eq!(idx.lookup(1000).unwrap().position, 8192);
        let loaded = OffsetIndex::load(&p, 10_000).unwrap().unwrap();
        assert_eq!(loaded.len(), 3);
        // An index pointing past the log is stale and refused.
        assert!(OffsetIndex::load(&p, 8000).unwrap().is_none());
    }

    #[test]
    fn time_index_lookup_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.timeindex");
        let mut idx = TimeIndex::create(&p).unwrap();
        idx.maybe_append(100, 0).unwrap();
        idx.maybe_append(90, 1).unwrap(); // not a new max: skipped
        idx.maybe_append(200, 5).unwrap();
        assert_eq!(idx.lookup(150).unwrap().relative_offset, 0);
        assert_eq!(idx.lookup(250).unwrap().relative_offset, 5);
        assert!(idx.lookup(50).is_none());
        let loaded = TimeIndex::load(&p, Some(5)).unwrap().unwrap();
        assert_eq!(loaded.last().unwrap().timestamp, 200);
        assert!(TimeIndex::load(&p, Some(4)).unwrap().is_none());
    }
}
