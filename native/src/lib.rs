//! The KV block index of `epp/kvevents/index.py`, in Rust, plus a decoder for the common
//! case of vLLM's msgpack event batches (positional events, the three known tags).
//!
//! Why: indexing in CPython costs ~1.5 µs per event (Python ints for every token id, a
//! dozen dict operations per block); the intake target is ~2 µs per event all in. This
//! module does the same work without Python objects. It must behave exactly like the
//! pure-Python `KVBlockIndex` (the reference and the fallback; the unit tests run over
//! both). Anything the decoder is not sure about (map-encoded events, unknown tags, extra
//! keys, a block size that differs from the scorer's, malformed msgpack) is *declined*
//! before anything changes: `apply_payload` returns None and the caller decodes the batch
//! in Python, which counts and reports the fault as before.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyString};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use xxhash_rust::xxh64::xxh64;

// -- hashing for the maps: keys are already xxhash values or engine hashes ---------------

#[derive(Default)]
struct Fx(u64);

impl Fx {
    #[inline]
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for Fx {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            self.add(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i)
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64)
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64)
    }
    #[inline]
    fn write_i128(&mut self, i: i128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// An engine's block hash: an integer or bytes (vLLM's ExternalBlockHash), compared for
/// equality only, as Python compares them (an int never equals bytes).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum EH {
    I(i128),
    B(Box<[u8]>),
}

/// One of our keys on one endpoint. Which engine hashes stored it is `Ep::by_engine`
/// (each engine hash names one key); `holders` counts them (almost always 1). Python's
/// index keeps the hashes themselves; a count is all the Rust side needs (16 bytes, not 64).
struct Held {
    stamp: u64,
    holders: u32,
}

struct Ep {
    slot: usize,
    /// Our key -> who stored it; `stamp` orders by last store (the LRU).
    keys: FxMap<u64, Held>,
    /// (stamp, key) in store order; entries whose stamp is no longer the key's are stale.
    order: VecDeque<(u64, u64)>,
    by_engine: FxMap<EH, u64>,
}

impl Ep {
    fn new(slot: usize) -> Self {
        Ep { slot, keys: FxMap::default(), order: VecDeque::new(), by_engine: FxMap::default() }
    }
}

#[derive(Default, Clone, Copy)]
struct Counts {
    stored: u64,
    removed: u64,
    orphans: u64,
    malformed: u64,
}

fn root_key(lora_name: Option<&str>) -> u64 {
    match lora_name {
        Some(n) if !n.is_empty() => {
            let mut b = Vec::with_capacity(5 + n.len());
            b.extend_from_slice(b"lora:");
            b.extend_from_slice(n.as_bytes());
            xxh64(&b, 0)
        }
        _ => xxh64(b"base", 0),
    }
}

/// Chained keys exactly as `index.block_keys`, into `out`: token ids as native-endian
/// int64s, each block's bytes (plus its extra-key bytes, when any) hashed with the previous
/// key as seed; `buf` is scratch space.
fn chain_keys(tokens: &[i64], bs: usize, n: usize, parent: u64,
              extras: Option<&[Option<Vec<u8>>]>, buf: &mut Vec<u8>, out: &mut Vec<u64>) {
    out.clear();
    let mut h = parent;
    for i in 0..n {
        buf.clear();
        for t in &tokens[i * bs..(i + 1) * bs] {
            buf.extend_from_slice(&t.to_ne_bytes());
        }
        if let Some(ex) = extras {
            if let Some(Some(e)) = ex.get(i) {
                buf.extend_from_slice(e);
            }
        }
        h = xxh64(buf, h);
        out.push(h);
    }
}

// -- the index ---------------------------------------------------------------------------

#[pyclass(module = "epp.kvevents._native")]
struct Index {
    #[pyo3(get, set)]
    max_entries: usize,
    /// owners[w][key]: bits of slots 64w..64w+63 that hold `key`.
    owners: Vec<FxMap<u64, u64>>,
    eps: HashMap<String, Ep>,
    names: Vec<Option<Py<PyString>>>,
    free_slots: Vec<usize>,
    size: usize,
    stamp: u64,
    /// Scratch space for `store` (no allocation per event).
    buf: Vec<u8>,
    keys_buf: Vec<u64>,
}

/// One decoded event of the fast path.
enum Ev {
    Stored {
        hashes: Vec<EH>,
        parent: Option<EH>,
        tokens: Vec<i64>,
        tokens_ok: bool,
        block_size: i128,
        lora_name: Option<String>,
        keep: bool,
    },
    Removed { hashes: Vec<EH>, keep: bool },
    Cleared,
}

impl Index {
    fn endpoint(&mut self, py: Python<'_>, name: &str) -> &mut Ep {
        if !self.eps.contains_key(name) {
            let slot = self.free_slots.pop().unwrap_or(self.eps.len());
            if self.names.len() <= slot {
                self.names.resize_with(slot + 1, || None);
            }
            self.names[slot] = Some(PyString::new(py, name).unbind());
            while self.owners.len() <= slot / 64 {
                self.owners.push(FxMap::default());
            }
            self.eps.insert(name.to_owned(), Ep::new(slot));
        }
        self.eps.get_mut(name).unwrap()
    }

    fn unown(owners: &mut [FxMap<u64, u64>], slot: usize, key: u64) {
        let map = &mut owners[slot / 64];
        let bit = 1u64 << (slot % 64);
        if let Some(m) = map.get_mut(&key) {
            *m &= !bit;
            if *m == 0 {
                map.remove(&key);
            }
        }
    }

    /// One engine hash no longer holds `key` on `ep`; the key goes when none does
    /// (index._drop).
    fn drop_one(owners: &mut [FxMap<u64, u64>], size: &mut usize, ep: &mut Ep, key: u64) {
        let gone = match ep.keys.get_mut(&key) {
            None => return,
            Some(h) => {
                h.holders -= 1;
                h.holders == 0
            }
        };
        if gone {
            ep.keys.remove(&key);
            Self::unown(owners, ep.slot, key);
            *size -= 1;
        }
    }

    /// index._stored after its medium/group filter; `tokens_ok` false when an id is not a
    /// 64-bit integer.
    #[allow(clippy::too_many_arguments)]
    fn store(&mut self, py: Python<'_>, name: &str, hashes: Vec<EH>, parent: Option<&EH>,
             root: u64, tokens: &[i64], n_tokens: usize, tokens_ok: bool, bs: i128,
             extras: Option<&[Option<Vec<u8>>]>, c: &mut Counts) {
        if bs < 1 || (n_tokens as i128) != bs * hashes.len() as i128 {
            c.malformed += 1;
            return;
        }
        let bs = bs as usize;
        if !self.eps.contains_key(name) {
            self.endpoint(py, name);
        }
        let Index { owners, eps, size, stamp, buf, keys_buf, .. } = self;
        let ep = eps.get_mut(name).unwrap();
        let parent_key = match parent {
            // 0 means "no parent" too (NO_PARENT in index.py).
            None | Some(EH::I(0)) => root,
            Some(p) => match ep.by_engine.get(p) {
                None => {
                    c.orphans += hashes.len() as u64;
                    return;
                }
                Some(k) => *k,
            },
        };
        if !tokens_ok {
            c.malformed += 1;
            return;
        }
        let n = hashes.len();
        chain_keys(tokens, bs, n, parent_key, extras, buf, keys_buf);
        let keys = &*keys_buf;
        let word = ep.slot / 64;
        let bit = 1u64 << (ep.slot % 64);
        for (e, key) in hashes.into_iter().zip(keys.iter().copied()) {
            let old = ep.by_engine.insert(e, key);
            let already = old == Some(key);
            if let Some(old) = old {
                if old != key {
                    // an engine hash reused for other content
                    Self::drop_one(owners, size, ep, old);
                }
            }
            *stamp += 1;
            let st = *stamp;
            match ep.keys.get_mut(&key) {
                None => {
                    ep.keys.insert(key, Held { stamp: st, holders: 1 });
                    *owners[word].entry(key).or_insert(0) |= bit;
                    *size += 1;
                }
                Some(h) => {
                    if !already {
                        h.holders += 1;
                    }
                    h.stamp = st;
                }
            }
            ep.order.push_back((st, key));
        }
        c.stored += n as u64;
        Self::compact(ep);
    }

    /// Drop stale LRU entries once they outnumber the live ones.
    fn compact(ep: &mut Ep) {
        if ep.order.len() > 2 * ep.keys.len() + 64 {
            let keys = &ep.keys;
            ep.order.retain(|(st, k)| keys.get(k).is_some_and(|h| h.stamp == *st));
        }
    }

    fn remove(&mut self, name: &str, hashes: &[EH], c: &mut Counts) {
        let Index { owners, eps, size, .. } = self;
        let Some(ep) = eps.get_mut(name) else { return };
        for e in hashes {
            let Some(key) = ep.by_engine.remove(e) else { continue };
            c.removed += 1;
            Self::drop_one(owners, size, ep, key);
        }
    }

    fn clear_ep(&mut self, name: &str) {
        let Index { owners, eps, size, .. } = self;
        let Some(ep) = eps.get_mut(name) else { return };
        for key in ep.keys.keys() {
            Self::unown(owners, ep.slot, *key);
        }
        *size -= ep.keys.len();
        ep.keys.clear();
        ep.order.clear();
        ep.by_engine.clear();
    }

    fn trim(&mut self) {
        let share = self.max_entries / self.eps.len().max(1);
        let target = (share - share / 10).max(1);
        let Index { owners, eps, size, .. } = self;
        for ep in eps.values_mut() {
            let mut excess = ep.keys.len().saturating_sub(target);
            if excess == 0 {
                continue;
            }
            let mut gone: FxMap<u64, ()> = FxMap::default();
            while excess > 0 {
                let Some((st, key)) = ep.order.pop_front() else { break };
                let live = ep.keys.get(&key).is_some_and(|h| h.stamp == st);
                if !live {
                    continue;
                }
                ep.keys.remove(&key);
                gone.insert(key, ());
                Self::unown(owners, ep.slot, key);
                *size -= 1;
                excess -= 1;
            }
            // The engine hashes of the dropped keys (rare: once per ~10% of the bound).
            ep.by_engine.retain(|_, k| !gone.contains_key(k));
        }
    }

    fn apply_events(&mut self, py: Python<'_>, name: &str, events: Vec<Ev>) -> Counts {
        let mut c = Counts::default();
        for ev in events {
            match ev {
                Ev::Stored { hashes, parent, tokens, tokens_ok, block_size, lora_name, keep } => {
                    if keep {
                        let n_tokens = tokens.len();
                        let root = root_key(lora_name.as_deref());
                        self.store(py, name, hashes, parent.as_ref(), root, &tokens, n_tokens,
                                   tokens_ok, block_size, None, &mut c);
                    }
                }
                Ev::Removed { hashes, keep } => {
                    if keep {
                        self.remove(name, &hashes, &mut c);
                    }
                }
                Ev::Cleared => self.clear_ep(name),
            }
        }
        if self.size > self.max_entries {
            self.trim();
        }
        c
    }
}

fn engine_hash(o: &Bound<'_, PyAny>) -> PyResult<EH> {
    if let Ok(b) = o.downcast::<PyBytes>() {
        return Ok(EH::B(b.as_bytes().into()));
    }
    if o.is_instance_of::<PyInt>() {
        return Ok(EH::I(o.extract::<i128>()?));
    }
    Err(PyTypeError::new_err("an engine block hash must be an int or bytes"))
}

#[pymethods]
impl Index {
    #[new]
    #[pyo3(signature = (max_entries))]
    fn new(max_entries: usize) -> Self {
        Index {
            max_entries: max_entries.max(1),
            owners: vec![FxMap::default()],
            eps: HashMap::new(),
            names: Vec::new(),
            free_slots: Vec::new(),
            size: 0,
            stamp: 0,
            buf: Vec::new(),
            keys_buf: Vec::new(),
        }
    }

    #[getter]
    fn size(&self) -> usize {
        self.size
    }

    fn blocks_of(&self, name: &str) -> usize {
        self.eps.get(name).map_or(0, |e| e.keys.len())
    }

    fn holds(&self, name: &str, key: &Bound<'_, PyAny>) -> bool {
        let Ok(k) = key.extract::<u64>() else { return false };
        self.eps.get(name).is_some_and(|e| e.keys.contains_key(&k))
    }

    /// An endpoint's keys, least recently stored first (tests compare implementations).
    fn lru_keys(&self, name: &str) -> Vec<u64> {
        let Some(ep) = self.eps.get(name) else { return Vec::new() };
        ep.order
            .iter()
            .filter(|(st, k)| ep.keys.get(k).is_some_and(|h| h.stamp == *st))
            .map(|(_, k)| *k)
            .collect()
    }

    /// Per endpoint, the longest run of leading blocks of `keys` it holds (0 omitted).
    fn r#match<'py>(&self, py: Python<'py>, keys: Vec<u64>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        if keys.is_empty() {
            return Ok(out);
        }
        let nw = self.owners.len();
        let mut masks: Vec<u64> = (0..nw)
            .map(|w| self.owners[w].get(&keys[0]).copied().unwrap_or(0))
            .collect();
        if masks.iter().all(|m| *m == 0) {
            return Ok(out);
        }
        let emit = |out: &Bound<'py, PyDict>, w: usize, mut gone: u64, k: usize| -> PyResult<()> {
            while gone != 0 {
                let b = gone.trailing_zeros() as usize;
                if let Some(Some(n)) = self.names.get(w * 64 + b) {
                    out.set_item(n.bind(py), k)?;
                }
                gone &= gone - 1;
            }
            Ok(())
        };
        let mut k = 1usize;
        for key in &keys[1..] {
            let mut any = false;
            for (w, mask) in masks.iter_mut().enumerate() {
                if *mask == 0 {
                    continue;
                }
                let m = *mask & self.owners[w].get(key).copied().unwrap_or(0);
                if m != *mask {
                    emit(&out, w, *mask ^ m, k)?;
                    *mask = m;
                }
                any |= m != 0;
            }
            if !any {
                return Ok(out);
            }
            k += 1;
        }
        for (w, mask) in masks.iter().enumerate() {
            emit(&out, w, *mask, k)?;
        }
        Ok(out)
    }

    /// index._stored for one event the caller already filtered (medium, group); returns
    /// (stored, orphans, malformed).
    #[pyo3(signature = (name, hashes, parent, root, token_ids, block_size, extras))]
    #[allow(clippy::too_many_arguments)]
    fn store_blocks(&mut self, py: Python<'_>, name: &str, hashes: &Bound<'_, PyAny>,
                    parent: &Bound<'_, PyAny>, root: u64, token_ids: &Bound<'_, PyAny>,
                    block_size: i128, extras: Option<Vec<Option<Vec<u8>>>>)
                    -> PyResult<(u64, u64, u64)> {
        let mut hs = Vec::new();
        for h in hashes.try_iter()? {
            hs.push(engine_hash(&h?)?);
        }
        let parent = if parent.is_none() { None } else { Some(engine_hash(parent)?) };
        let n_tokens = token_ids.len()?;
        let (tokens, ok) = match token_ids.extract::<Vec<i64>>() {
            Ok(t) => (t, true),
            Err(_) => (Vec::new(), false),
        };
        let mut c = Counts::default();
        self.store(py, name, hs, parent.as_ref(), root, &tokens, n_tokens, ok, block_size,
                   extras.as_deref(), &mut c);
        Ok((c.stored, c.orphans, c.malformed))
    }

    /// index._removed for one event the caller already filtered; returns the count removed.
    fn remove_blocks(&mut self, name: &str, hashes: &Bound<'_, PyAny>) -> PyResult<u64> {
        let mut hs = Vec::new();
        for h in hashes.try_iter()? {
            hs.push(engine_hash(&h?)?);
        }
        let mut c = Counts::default();
        self.remove(name, &hs, &mut c);
        Ok(c.removed)
    }

    fn clear(&mut self, name: &str) {
        self.clear_ep(name);
    }

    fn forget(&mut self, name: &str) {
        if !self.eps.contains_key(name) {
            return;
        }
        self.clear_ep(name);
        let ep = self.eps.remove(name).unwrap();
        self.names[ep.slot] = None;
        self.free_slots.push(ep.slot);
    }

    fn trim_if_over(&mut self) {
        if self.size > self.max_entries {
            self.trim();
        }
    }

    /// Decode one msgpack EventBatch and apply it to `name`'s entries, if it is the common
    /// case (see the module doc): returns (events, stored, removed, orphans, malformed), or
    /// None, having changed nothing, for the caller to decode it in Python.
    fn apply_payload(&mut self, py: Python<'_>, name: &str, payload: &[u8], block_size: i64)
                     -> Option<(usize, u64, u64, u64, u64)> {
        let events = parse_batch(payload, block_size as i128)?;
        let n = events.len();
        let c = self.apply_events(py, name, events);
        Some((n, c.stored, c.removed, c.orphans, c.malformed))
    }
}

// -- msgpack: just what an EventBatch holds; None = not sure, let Python decode ----------

struct Rd<'a> {
    b: &'a [u8],
    i: usize,
}

const MAX_DEPTH: u32 = 64;

impl<'a> Rd<'a> {
    #[inline]
    fn byte(&mut self) -> Option<u8> {
        let v = *self.b.get(self.i)?;
        self.i += 1;
        Some(v)
    }
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    #[inline]
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.i.checked_add(n)?;
        let s = self.b.get(self.i..end)?;
        self.i = end;
        Some(s)
    }
    #[inline]
    fn be(&mut self, n: usize) -> Option<u64> {
        let s = self.take(n)?;
        Some(match n {
            1 => s[0] as u64,
            2 => u16::from_be_bytes([s[0], s[1]]) as u64,
            4 => u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as u64,
            _ => s.iter().fold(0u64, |a, &x| (a << 8) | x as u64),
        })
    }
    fn array(&mut self) -> Option<usize> {
        match self.byte()? {
            t @ 0x90..=0x9f => Some((t & 0x0f) as usize),
            0xdc => Some(self.be(2)? as usize),
            0xdd => Some(self.be(4)? as usize),
            _ => None,
        }
    }
    fn nil(&mut self) -> bool {
        if self.peek() == Some(0xc0) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    #[inline]
    fn int(&mut self) -> Option<i128> {
        let t = self.byte()?;
        Some(match t {
            0x00..=0x7f => t as i128,
            0xe0..=0xff => (t as i8) as i128,
            0xcc => self.be(1)? as i128,
            0xcd => self.be(2)? as i128,
            0xce => self.be(4)? as i128,
            0xcf => self.be(8)? as i128,
            0xd0 => (self.be(1)? as u8 as i8) as i128,
            0xd1 => (self.be(2)? as u16 as i16) as i128,
            0xd2 => (self.be(4)? as u32 as i32) as i128,
            0xd3 => (self.be(8)? as i64) as i128,
            _ => return None,
        })
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = match self.byte()? {
            t @ 0xa0..=0xbf => (t & 0x1f) as usize,
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return None,
        };
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn opt_str(&mut self) -> Option<Option<&'a str>> {
        if self.nil() { Some(None) } else { Some(Some(self.str()?)) }
    }
    fn opt_int(&mut self) -> Option<Option<i128>> {
        if self.nil() { Some(None) } else { Some(Some(self.int()?)) }
    }
    fn float_or_int(&mut self) -> Option<()> {
        match self.peek()? {
            0xca => self.take(5).map(|_| ()),
            0xcb => self.take(9).map(|_| ()),
            _ => self.int().map(|_| ()),
        }
    }
    fn hash(&mut self) -> Option<EH> {
        let n = match self.peek()? {
            0xc4 => {
                self.i += 1;
                self.be(1)? as usize
            }
            0xc5 => {
                self.i += 1;
                self.be(2)? as usize
            }
            0xc6 => {
                self.i += 1;
                self.be(4)? as usize
            }
            _ => return Some(EH::I(self.int()?)),
        };
        Some(EH::B(self.take(n)?.into()))
    }
    fn hashes(&mut self) -> Option<Vec<EH>> {
        let n = self.array()?;
        let mut v = Vec::with_capacity(n.min(self.b.len()));
        for _ in 0..n {
            v.push(self.hash()?);
        }
        Some(v)
    }
    /// Any one msgpack value (trailing fields a newer vLLM may add).
    fn skip(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let t = self.byte()?;
        let (n, items) = match t {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * (t & 0x0f) as usize),
            0x90..=0x9f => (0, (t & 0x0f) as usize),
            0xa0..=0xbf => ((t & 0x1f) as usize, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 | 0xca => (4, 0),
            0xcf | 0xd3 | 0xcb => (8, 0),
            0xd9 | 0xc4 => (self.be(1)? as usize, 0),
            0xda | 0xc5 => (self.be(2)? as usize, 0),
            0xdb | 0xc6 => (self.be(4)? as usize, 0),
            0xdc => (0, self.be(2)? as usize),
            0xdd => (0, self.be(4)? as usize),
            0xde => (0, 2 * self.be(2)? as usize),
            0xdf => (0, 2 * self.be(4)? as usize),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xc7 => (self.be(1)? as usize + 1, 0),
            0xc8 => (self.be(2)? as usize + 1, 0),
            0xc9 => (self.be(4)? as usize + 1, 0),
            _ => return None, // 0xc1: never used
        };
        self.take(n)?;
        for _ in 0..items {
            self.skip(depth + 1)?;
        }
        Some(())
    }
}

/// An event's optional trailing fields, read in their order, each only when the array
/// has it (older vLLMs send fewer); `rest` skips any that a newer vLLM added.
struct Trailing {
    at: usize,
    n: usize,
}

impl Trailing {
    fn next<'a, T>(
        &mut self,
        r: &mut Rd<'a>,
        read: impl FnOnce(&mut Rd<'a>) -> Option<Option<T>>,
    ) -> Option<Option<T>> {
        if self.at >= self.n {
            return Some(None);
        }
        self.at += 1;
        read(r)
    }

    fn rest(self, r: &mut Rd<'_>) -> Option<()> {
        for _ in self.at..self.n {
            r.skip(0)?;
        }
        Some(())
    }
}

fn gpu_group0(medium: Option<&str>, group: Option<i128>) -> bool {
    matches!(medium, None | Some("GPU")) && matches!(group, None | Some(0))
}

fn parse_event(r: &mut Rd<'_>, scorer_bs: i128) -> Option<Ev> {
    let n = r.array()?;
    if n == 0 {
        return None;
    }
    let tag = r.str()?;
    let ev = match tag {
        "BlockStored" => {
            if n < 5 {
                return None;
            }
            let hashes = r.hashes()?;
            let parent = if r.nil() { None } else { Some(r.hash()?) };
            let nt = r.array()?;
            let mut tokens = Vec::with_capacity(nt.min(r.b.len()));
            let mut tokens_ok = true;
            for _ in 0..nt {
                let t = r.int()?;
                match i64::try_from(t) {
                    Ok(v) => tokens.push(v),
                    Err(_) => {
                        tokens_ok = false;
                        tokens.push(0);
                    }
                }
            }
            let block_size = r.int()?;
            if block_size != scorer_bs {
                return None; // the subscriber reports the mismatch
            }
            let mut more = Trailing { at: 5, n }; // tag and the four required fields
            more.next(r, Rd::opt_int)?; // lora_id
            let medium = more.next(r, Rd::opt_str)?;
            let lora_name = more.next(r, Rd::opt_str)?;
            // extra_keys: only "none" here; anything else is hashed into the key by
            // Python's repr(), so Python decodes it.
            more.next(r, |r| {
                if !r.nil() {
                    for _ in 0..r.array()? {
                        if !r.nil() {
                            return None;
                        }
                    }
                }
                Some(Some(()))
            })?;
            let group = more.next(r, Rd::opt_int)?;
            more.rest(r)?;
            Ev::Stored {
                hashes,
                parent,
                tokens,
                tokens_ok,
                block_size,
                keep: gpu_group0(medium, group),
                lora_name: lora_name.map(str::to_owned),
            }
        }
        "BlockRemoved" => {
            if n < 2 {
                return None;
            }
            let hashes = r.hashes()?;
            let mut more = Trailing { at: 2, n };
            let medium = more.next(r, Rd::opt_str)?;
            let group = more.next(r, Rd::opt_int)?;
            more.rest(r)?;
            Ev::Removed { hashes, keep: gpu_group0(medium, group) }
        }
        "AllBlocksCleared" => {
            for _ in 1..n {
                r.skip(0)?;
            }
            Ev::Cleared
        }
        _ => return None,
    };
    Some(ev)
}

/// `[ts, [event...], data_parallel_rank?, ...]` -> events, or None.
fn parse_batch(payload: &[u8], scorer_bs: i128) -> Option<Vec<Ev>> {
    let mut r = Rd { b: payload, i: 0 };
    let n = r.array()?;
    if n < 2 {
        return None;
    }
    r.float_or_int()?;
    let m = r.array()?;
    let mut events = Vec::with_capacity(m.min(payload.len()));
    for _ in 0..m {
        events.push(parse_event(&mut r, scorer_bs)?);
    }
    if n > 2 {
        r.opt_int()?; // data_parallel_rank
        for _ in 3..n {
            r.skip(0)?;
        }
    }
    if r.i != payload.len() {
        return None; // trailing bytes: msgspec rejects them
    }
    Some(events)
}

#[pymodule]
#[pyo3(name = "_native")]
fn epp_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Index>()?;
    Ok(())
}
