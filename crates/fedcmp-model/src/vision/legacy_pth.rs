//! Reader for PyTorch checkpoints in the LEGACY (pre-1.6, non-zip) format,
//! plus a pass-through to candle's reader for the modern zip format, so a
//! caller can hand any `.pth` / `.pt` state dict to [`load_legacy_pth`].
//!
//! Why our own reader: torchvision's released ImageNet checkpoints (e.g.
//! `mobilenet_v2-b0353104.pth`) predate the zip format, and candle 0.11's
//! `candle_core::pickle` only opens zip files. Its pickle `Stack` is also not
//! enough for the legacy layout: the leading magic number is a 10-byte
//! `LONG1`, which overflows its i64 decoder, and it panics (`Vec::remove`)
//! rather than erroring on malformed tensor tuples. So this module carries a
//! small, bounds-checked unpickler of its own.
//!
//! The legacy layout (`torch/serialization.py`, `_legacy_save`) is:
//!
//! 1. pickle: the magic number `0x1950a86a20f9469cfc6c`;
//! 2. pickle: the protocol version, 1001;
//! 3. pickle: `sys_info` (`little_endian`, `type_sizes`, ...);
//! 4. pickle: the object, here an `OrderedDict` state dict whose values are
//!    `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
//!    and whose storages are persistent ids
//!    `('storage', torch.FloatStorage, key, location, numel, view_metadata)`;
//! 5. pickle: the list of storage keys, in the order their data follows;
//! 6. for each key: a little-endian u64 element count, then the raw
//!    little-endian bytes of the storage.
//!
//! Tensors are views: an element offset into a (possibly shared) storage and
//! arbitrary strides. Every view is bounds-checked against its storage and
//! gathered into a contiguous f32 tensor.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::weights::WeightMap;

/// The first pickle of a legacy torch file.
const MAGIC_NUMBER: i128 = 0x1950_a86a_20f9_469c_fc6c;
/// The only legacy protocol torch has ever written.
const PROTOCOL_VERSION: i128 = 1001;
/// How the error messages name this format.
const FORMAT: &str = "torch pickle";
/// Nesting deeper than this is not a state dict; refusing it keeps the
/// recursive drop of the object tree off the end of the thread's stack.
const MAX_DEPTH: usize = 256;

/// Reads a PyTorch state dict, converting every tensor to f32 on `device`.
///
/// Legacy (non-zip) files are parsed here; zip files (torch >= 1.6 default)
/// are delegated to `candle_core::pickle::read_all`. Non-tensor entries of
/// the dict are skipped. A dict that only wraps the weights under a
/// `state_dict` key is unwrapped.
pub fn load_legacy_pth(path: &Path, device: &Device) -> Result<WeightMap> {
    // Sniff first: a zip checkpoint may be gigabytes that candle reads
    // entry by entry, so it must not be slurped here.
    let mut head = Vec::with_capacity(4);
    std::fs::File::open(path)
        .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 4), &mut head))
        .map_err(|e| ModelError::io(path, e))?;
    if head == b"PK\x03\x04" {
        return load_zip_pth(path, device);
    }
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let tensors = parse_legacy(&bytes, device)
        .map_err(|message| ModelError::format(path, FORMAT, message))?;
    Ok(WeightMap::new(path, tensors))
}

/// The modern format through candle, made safe first. Candle's reader sizes
/// buffers from lengths in the pickle and from tensor shapes without
/// checking them against the file (fuzzing found a 1.7 GB allocation from
/// a 3 kB file), and indexes pickled tuples with `Vec::remove`, which
/// panics on a malformed file. So: every pickle in the archive is scanned
/// first with each length checked against what follows it; each tensor
/// must fit in its storage entry before candle reads it; and a panic is
/// turned into an error.
fn load_zip_pth(path: &Path, device: &Device) -> Result<WeightMap> {
    const ZIP_FORMAT: &str = "torch zip checkpoint";
    let bad = |message: String| ModelError::format(path, ZIP_FORMAT, message);
    let entry_sizes = check_zip_pickles(path).map_err(bad)?;
    let owned = path.to_path_buf();
    let pth = std::panic::catch_unwind(move || candle_core::pickle::PthTensors::new(&owned, None))
        .map_err(|_| bad("candle's .pth reader panicked".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort_unstable();
    if names.is_empty() {
        return Err(bad("no tensors found (is it a state dict?)".into()));
    }
    let mut tensors = HashMap::with_capacity(names.len());
    for name in names {
        let info = &pth.tensor_infos()[name];
        let needed = info
            .layout
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.size_in_bytes()))
            // Candle keeps a pickled view's offset in bytes.
            .and_then(|n| n.checked_add(info.layout.start_offset()));
        let held = entry_sizes.get(&info.path).copied();
        let fits = matches!((needed, held), (Some(n), Some(h)) if n as u64 <= h);
        if !fits {
            return Err(bad(format!(
                "tensor `{name}`: shape {:?} of {:?} needs more bytes than its storage `{}` \
                 holds ({})",
                info.layout.dims(),
                info.dtype,
                info.path,
                held.map_or("no such entry".to_string(), |h| format!("{h} bytes"))
            )));
        }
        let tensor = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pth.get(name)))
            .map_err(|_| bad("candle's .pth reader panicked".into()))?
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?
            .ok_or_else(|| bad(format!("tensor `{name}` vanished")))?;
        tensors.insert(
            name.clone(),
            tensor.to_dtype(DType::F32)?.to_device(device)?,
        );
    }
    Ok(WeightMap::new(path, tensors))
}

/// The largest pickle (`data.pkl`) of a zip checkpoint: a state dict's
/// pickle holds names and shapes only, kilobytes even for large models.
const MAX_ZIP_PICKLE: u64 = 64 << 20;

/// Scans every `data.pkl` of the archive (see [`scan_pickle`]) and returns
/// each entry's uncompressed size by name.
fn check_zip_pickles(path: &Path) -> PResult<HashMap<String, u64>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut archive =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    let mut sizes = HashMap::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| e.to_string())?;
        let name = entry.name().map_err(|e| e.to_string())?.to_string();
        sizes.insert(name.clone(), entry.size());
        if !name.ends_with("data.pkl") {
            continue;
        }
        if entry.size() > MAX_ZIP_PICKLE {
            return Err(format!(
                "{name} claims {} bytes; a state dict's pickle is far smaller",
                entry.size()
            ));
        }
        let mut bytes = Vec::new();
        entry
            .by_ref()
            .take(MAX_ZIP_PICKLE)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{name}: {e}"))?;
        scan_pickle(&bytes).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(sizes)
}

/// Walks a pickle's opcodes to its STOP without building anything, checking
/// every length against the bytes that follow it and refusing opcodes no
/// state dict uses: after this, no length in it can size a buffer past
/// the pickle itself.
fn scan_pickle(bytes: &[u8]) -> PResult<()> {
    let mut cur = Cursor {
        data: bytes,
        pos: 0,
    };
    loop {
        let op = cur.u8()?;
        match op {
            b'.' => return Ok(()),
            // No argument.
            b'('
            | b'0'
            | b'1'
            | b'2'
            | b'N'
            | 0x88
            | 0x89
            | b')'
            | b't'
            | 0x85..=0x87
            | b']'
            | 0x8f
            | b'l'
            | 0x91
            | b'a'
            | b'e'
            | 0x90
            | b'}'
            | b'd'
            | b's'
            | b'u'
            | b'R'
            | 0x81
            | 0x92
            | b'b'
            | b'Q'
            | 0x93
            | 0x94
            | b'o' => {}
            // Fixed-size arguments.
            b'K' | b'q' | b'h' | 0x80 | 0x82 => {
                cur.take(1)?;
            }
            b'M' | 0x83 => {
                cur.take(2)?;
            }
            b'J' | b'r' | b'j' | 0x84 => {
                cur.take(4)?;
            }
            b'G' | 0x95 => {
                cur.take(8)?;
            }
            // Length-prefixed arguments.
            b'U' | 0x8c | b'C' | 0x8a => {
                let n = cur.u8()?;
                cur.take(usize::from(n))?;
            }
            b'X' | b'B' => {
                let n = cur.u32_le()?;
                cur.len_u64(u64::from(n))?;
            }
            b'T' | 0x8b => {
                let n = cur.i32_le()?;
                let n = u64::try_from(n).map_err(|_| format!("negative length {n}"))?;
                cur.len_u64(n)?;
            }
            0x8d | 0x8e | 0x96 => {
                let n = cur.u64_le()?;
                cur.len_u64(n)?;
            }
            // Newline-terminated arguments.
            b'I' | b'L' | b'F' | b'S' | b'V' | b'p' | b'g' | b'P' => {
                cur.line()?;
            }
            b'c' | b'i' => {
                cur.line()?;
                cur.line()?;
            }
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} at byte {} is not one a state dict uses",
                    cur.pos - 1
                ))
            }
        }
    }
}

/// Parse errors are plain messages; the caller adds the path and format.
type PResult<T> = std::result::Result<T, String>;

/// Parses the whole legacy file held in `bytes`.
fn parse_legacy(bytes: &[u8], device: &Device) -> PResult<HashMap<String, Tensor>> {
    let mut cur = Cursor {
        data: bytes,
        pos: 0,
    };
    let budget = bytes.len().saturating_mul(16).saturating_add(1 << 20);

    let magic = Unpickler::new(&mut cur, budget).load()?;
    if magic != Value::Int(MAGIC_NUMBER) {
        return Err(format!(
            "not a legacy torch file: expected magic number {MAGIC_NUMBER:#x} in the first \
             pickle, found {}",
            magic.describe()
        ));
    }
    let protocol = Unpickler::new(&mut cur, budget).load()?;
    if protocol != Value::Int(PROTOCOL_VERSION) {
        return Err(format!(
            "unsupported legacy protocol {} (expected {PROTOCOL_VERSION})",
            protocol.describe()
        ));
    }
    let sys_info = Unpickler::new(&mut cur, budget).load()?;
    if let Value::Dict(items) = &sys_info {
        if dict_get(items, "little_endian") == Some(&Value::Bool(false)) {
            return Err(
                "written on a big-endian machine; only little-endian files are supported"
                    .to_string(),
            );
        }
    }
    let object = Unpickler::new(&mut cur, budget).load()?;
    let keys = match Unpickler::new(&mut cur, budget).load()? {
        Value::List(keys) | Value::Tuple(keys) => keys
            .into_iter()
            .map(|k| match k {
                Value::Str(s) => Ok(s),
                other => Err(format!(
                    "storage key is {}, expected a string",
                    other.describe()
                )),
            })
            .collect::<PResult<Vec<String>>>()?,
        other => {
            return Err(format!(
                "expected the list of storage keys after the object, found {}",
                other.describe()
            ))
        }
    };

    // Storage types come from the persistent ids, wherever they occur.
    let mut storage_kinds: HashMap<String, StorageKind> = HashMap::new();
    collect_storages(&object, &mut storage_kinds)?;

    // The raw storages follow, in the order of `keys`.
    let mut raw: HashMap<String, RawStorage<'_>> = HashMap::with_capacity(keys.len());
    for key in &keys {
        let kind = *storage_kinds
            .get(key)
            .ok_or_else(|| format!("storage `{key}` is listed but never referenced"))?;
        let at = cur.pos;
        let count = cur
            .u64_le()
            .map_err(|_| format!("truncated: storage `{key}` has no element count at byte {at}"))?;
        let count = usize::try_from(count)
            .map_err(|_| format!("storage `{key}`: element count {count} is too large"))?;
        let len = count
            .checked_mul(kind.elem_size())
            .ok_or_else(|| format!("storage `{key}`: element count {count} is too large"))?;
        let data = cur.take(len).map_err(|_| {
            format!(
                "truncated: storage `{key}` needs {len} bytes at byte {}, the file has {} left",
                cur.pos,
                cur.remaining()
            )
        })?;
        raw.insert(key.clone(), RawStorage { kind, count, data });
    }

    let entries = state_dict_entries(object)?;
    if entries.is_empty() {
        return Err("no tensors found (is it a state dict?)".to_string());
    }
    let mut decoded: HashMap<String, Vec<f32>> = HashMap::new();
    let mut tensors = HashMap::with_capacity(entries.len());
    for (name, view) in entries {
        let storage = raw.get(&view.storage.key).ok_or_else(|| {
            format!(
                "tensor `{name}`: storage `{}` has no data in the file",
                view.storage.key
            )
        })?;
        if storage.kind != view.storage.kind {
            return Err(format!(
                "tensor `{name}`: storage `{}` is used both as {} and as {}",
                view.storage.key,
                storage.kind.name(),
                view.storage.kind.name()
            ));
        }
        if !decoded.contains_key(&view.storage.key) {
            let values = storage
                .decode()
                .map_err(|e| format!("tensor `{name}`: {e}"))?;
            decoded.insert(view.storage.key.clone(), values);
        }
        let values = decoded
            .get(&view.storage.key)
            .ok_or_else(|| format!("tensor `{name}`: storage not decoded"))?;
        let data = view
            .gather(values)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        let tensor = Tensor::from_vec(data, view.size.as_slice(), device)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

// ---------------------------------------------------------------------------
// The unpickler.

/// A pickled Python object, reduced to what state dicts use. Calls are kept
/// symbolic (`Reduce`); the caller interprets the few it knows.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Mark,
    None,
    Bool(bool),
    /// Python ints; i128 holds the 80-bit magic number.
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global {
        module: String,
        name: String,
    },
    Reduce {
        callable: Box<Value>,
        args: Box<Value>,
    },
    Build {
        object: Box<Value>,
        state: Box<Value>,
    },
    PersistentId(Box<Value>),
}

impl Value {
    /// A short description for error messages (never the whole tree).
    fn describe(&self) -> String {
        match self {
            Value::Mark => "a mark".to_string(),
            Value::None => "None".to_string(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i:#x}"),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) => format!("string {:?}", s.chars().take(40).collect::<String>()),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(v) => format!("a tuple of {}", v.len()),
            Value::List(v) => format!("a list of {}", v.len()),
            Value::Dict(v) => format!("a dict of {}", v.len()),
            Value::Global { module, name } => format!("global {module}.{name}"),
            Value::Reduce { callable, .. } => format!("a call of {}", callable.describe()),
            Value::Build { object, .. } => format!("a built {}", object.describe()),
            Value::PersistentId(_) => "a persistent id".to_string(),
        }
    }

    fn is_global(&self, module: &str, name: &str) -> bool {
        matches!(self, Value::Global { module: m, name: n } if m == module && n == name)
    }
}

/// A stack or memo entry: the value with its nesting depth and node count,
/// tracked so hostile nesting or memo fan-out is refused instead of
/// exhausting the stack or memory.
#[derive(Debug, Clone)]
struct Node {
    value: Value,
    depth: usize,
    nodes: usize,
}

impl Node {
    fn leaf(value: Value) -> Self {
        Self {
            value,
            depth: 1,
            nodes: 1,
        }
    }

    fn container(value: Value, children: &[Node]) -> PResult<Self> {
        let depth = 1 + children.iter().map(|c| c.depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(format!("objects nested deeper than {MAX_DEPTH} levels"));
        }
        let nodes = children
            .iter()
            .fold(1usize, |n, c| n.saturating_add(c.nodes));
        Ok(Self {
            value,
            depth,
            nodes,
        })
    }

    /// Grows a container in place by `child` (APPEND, SETITEM, ...).
    fn absorb(&mut self, child_depth: usize, child_nodes: usize) -> PResult<()> {
        self.depth = self.depth.max(child_depth + 1);
        if self.depth > MAX_DEPTH {
            return Err(format!("objects nested deeper than {MAX_DEPTH} levels"));
        }
        self.nodes = self.nodes.saturating_add(child_nodes);
        Ok(())
    }
}

/// A bounds-checked reader over the file's bytes.
#[derive(Debug)]
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: needed {n} bytes at byte {}, the file has {} left",
                self.pos,
                self.remaining()
            ));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u16_le(&mut self) -> PResult<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32_le(&mut self) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i32_le(&mut self) -> PResult<i32> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    fn u64_le(&mut self) -> PResult<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length prefix, checked against what is left so a corrupt length
    /// cannot make us allocate gigabytes.
    fn len_u64(&mut self, len: u64) -> PResult<&'a [u8]> {
        let len = usize::try_from(len).map_err(|_| format!("length {len} is too large"))?;
        self.take(len)
    }

    /// A text line (protocol 0 arguments), without its newline.
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("truncated: unterminated text argument at byte {}", self.pos))?;
        let line = &rest[..end];
        self.pos += end + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        std::str::from_utf8(line)
            .map_err(|_| format!("non-UTF-8 text argument near byte {}", self.pos))
    }
}

/// Runs one pickle program (up to its STOP) and returns the object it built.
#[derive(Debug)]
struct Unpickler<'c, 'a> {
    cur: &'c mut Cursor<'a>,
    stack: Vec<Node>,
    memo: HashMap<u32, Node>,
    /// Nodes that memo lookups may still copy (see `MAX_DEPTH` for why).
    budget: usize,
}

impl<'c, 'a> Unpickler<'c, 'a> {
    fn new(cur: &'c mut Cursor<'a>, budget: usize) -> Self {
        Self {
            cur,
            stack: Vec::new(),
            memo: HashMap::new(),
            budget,
        }
    }

    fn pop(&mut self) -> PResult<Node> {
        self.stack
            .pop()
            .ok_or_else(|| format!("pickle stack underflow at byte {}", self.cur.pos))
    }

    fn top(&mut self) -> PResult<&mut Node> {
        let at = self.cur.pos;
        self.stack
            .last_mut()
            .ok_or_else(|| format!("pickle stack underflow at byte {at}"))
    }

    fn pop_to_mark(&mut self) -> PResult<Vec<Node>> {
        let mark = self
            .stack
            .iter()
            .rposition(|n| n.value == Value::Mark)
            .ok_or_else(|| format!("pickle MARK missing at byte {}", self.cur.pos))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn push_leaf(&mut self, value: Value) {
        self.stack.push(Node::leaf(value));
    }

    fn push_container(&mut self, value: Value, children: &[Node]) -> PResult<()> {
        let node = Node::container(value, children)?;
        self.stack.push(node);
        Ok(())
    }

    fn memo_put(&mut self, id: u32) -> PResult<()> {
        let node = self.top()?.clone();
        self.memo.insert(id, node);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> PResult<()> {
        let node = self
            .memo
            .get(&id)
            .ok_or_else(|| format!("pickle memo entry {id} is missing"))?;
        if node.nodes > self.budget {
            return Err("pickle memo references copy too many objects".to_string());
        }
        self.budget -= node.nodes;
        let node = node.clone();
        self.stack.push(node);
        Ok(())
    }

    /// Adds `items` (key, value, key, value, ...) to the dict on top.
    fn set_items(&mut self, items: Vec<Node>) -> PResult<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of objects".to_string());
        }
        let at = self.cur.pos;
        let dict = self.top()?;
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut iter = items.into_iter();
        while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
            dict.absorb(k.depth.max(v.depth), k.nodes.saturating_add(v.nodes))?;
            pairs.push((k.value, v.value));
        }
        match &mut dict.value {
            Value::Dict(d) => {
                d.extend(pairs);
                Ok(())
            }
            other => Err(format!("SETITEMS on {} at byte {at}", other.describe())),
        }
    }

    /// Adds `items` to the list (or set, kept as a list) on top.
    fn append_items(&mut self, items: Vec<Node>) -> PResult<()> {
        let at = self.cur.pos;
        let list = self.top()?;
        for item in &items {
            list.absorb(item.depth, item.nodes)?;
        }
        match &mut list.value {
            Value::List(l) => {
                l.extend(items.into_iter().map(|n| n.value));
                Ok(())
            }
            other => Err(format!("APPENDS on {} at byte {at}", other.describe())),
        }
    }

    fn int_line(&mut self) -> PResult<i128> {
        let line = self.cur.line()?;
        let digits = line.strip_suffix('L').unwrap_or(line);
        digits
            .parse::<i128>()
            .map_err(|_| format!("bad integer literal {line:?}"))
    }

    /// Decodes a little-endian two's-complement integer (LONG1 / LONG4).
    fn long_bytes(&self, bytes: &[u8]) -> PResult<i128> {
        if bytes.is_empty() {
            return Ok(0);
        }
        if bytes.len() > 16 {
            return Err(format!("integer of {} bytes is too large", bytes.len()));
        }
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut buf = if negative { [0xffu8; 16] } else { [0u8; 16] };
        buf[..bytes.len()].copy_from_slice(bytes);
        Ok(i128::from_le_bytes(buf))
    }

    fn string(&mut self, bytes: &[u8]) -> PResult<()> {
        // Python 2 `str` (BINSTRING) is bytes; torch.load decodes it as UTF-8.
        let s = String::from_utf8_lossy(bytes).into_owned();
        self.push_leaf(Value::Str(s));
        Ok(())
    }

    fn unicode(&mut self, bytes: &[u8]) -> PResult<()> {
        let s = std::str::from_utf8(bytes)
            .map_err(|_| format!("invalid UTF-8 string before byte {}", self.cur.pos))?;
        self.push_leaf(Value::Str(s.to_string()));
        Ok(())
    }

    fn reduce(&mut self, callable: Node, args: Node) -> PResult<()> {
        // An OrderedDict is rebuilt empty and filled by SETITEMS; keeping it a
        // plain dict (order preserved) lets those ops work on it.
        if callable.value.is_global("collections", "OrderedDict") {
            let mut node = Node::leaf(Value::Dict(Vec::new()));
            // Protocol 0/1 pickle it as OrderedDict([[k, v], ...]).
            if let Value::Tuple(a) = &args.value {
                if let Some(Value::List(pairs)) = a.first() {
                    let mut items = Vec::with_capacity(pairs.len());
                    for pair in pairs {
                        match pair {
                            Value::List(kv) | Value::Tuple(kv) if kv.len() == 2 => {
                                items.push((kv[0].clone(), kv[1].clone()));
                            }
                            other => {
                                return Err(format!(
                                    "OrderedDict item is {}, expected a pair",
                                    other.describe()
                                ))
                            }
                        }
                    }
                    node.value = Value::Dict(items);
                    node.absorb(args.depth, args.nodes)?;
                }
            }
            self.stack.push(node);
            return Ok(());
        }
        let children = [callable, args];
        let node = Node::container(Value::Mark, &children)?;
        let [callable, args] = children;
        self.stack.push(Node {
            value: Value::Reduce {
                callable: Box::new(callable.value),
                args: Box::new(args.value),
            },
            ..node
        });
        Ok(())
    }

    /// Runs opcodes until STOP.
    fn load(mut self) -> PResult<Value> {
        loop {
            let at = self.cur.pos;
            let op = self
                .cur
                .u8()
                .map_err(|_| format!("truncated: pickle ended without STOP at byte {at}"))?;
            match op {
                // PROTO
                0x80 => {
                    let version = self.cur.u8()?;
                    if version > 5 {
                        return Err(format!("unsupported pickle protocol {version}"));
                    }
                }
                // FRAME: a length hint only.
                0x95 => {
                    self.cur.u64_le()?;
                }
                // STOP
                b'.' => {
                    let node = self.pop()?;
                    return Ok(node.value);
                }
                b'(' => self.push_leaf(Value::Mark),
                // POP, POP_MARK, DUP
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_to_mark()?;
                }
                b'2' => {
                    let node = self.top()?.clone();
                    self.stack.push(node);
                }
                b'N' => self.push_leaf(Value::None),
                0x88 => self.push_leaf(Value::Bool(true)),
                0x89 => self.push_leaf(Value::Bool(false)),
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = self.cur.i32_le()?;
                    self.push_leaf(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.cur.u8()?;
                    self.push_leaf(Value::Int(v.into()));
                }
                b'M' => {
                    let v = self.cur.u16_le()?;
                    self.push_leaf(Value::Int(v.into()));
                }
                // LONG1, LONG4
                0x8a => {
                    let n = self.cur.u8()?;
                    let bytes = self.cur.take(n.into())?;
                    let v = self.long_bytes(bytes)?;
                    self.push_leaf(Value::Int(v));
                }
                0x8b => {
                    let n = self.cur.i32_le()?;
                    let n = usize::try_from(n).map_err(|_| "negative LONG4 length".to_string())?;
                    let bytes = self.cur.take(n)?;
                    let v = self.long_bytes(bytes)?;
                    self.push_leaf(Value::Int(v));
                }
                // INT (text; "00"/"01" are protocol 0 booleans), LONG (text)
                b'I' => {
                    let line = self.cur.line()?;
                    let value = match line {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(
                            line.parse::<i128>()
                                .map_err(|_| format!("bad integer literal {line:?}"))?,
                        ),
                    };
                    self.push_leaf(value);
                }
                b'L' => {
                    let v = self.int_line()?;
                    self.push_leaf(Value::Int(v));
                }
                // BINFLOAT (big-endian), FLOAT (text)
                b'G' => {
                    let v = f64::from_be_bytes(self.cur.array()?);
                    self.push_leaf(Value::Float(v));
                }
                b'F' => {
                    let line = self.cur.line()?;
                    let v = line
                        .parse::<f64>()
                        .map_err(|_| format!("bad float literal {line:?}"))?;
                    self.push_leaf(Value::Float(v));
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, UNICODE (text)
                b'X' => {
                    let n = self.cur.u32_le()?;
                    let bytes = self.cur.len_u64(n.into())?;
                    self.unicode(bytes)?;
                }
                0x8c => {
                    let n = self.cur.u8()?;
                    let bytes = self.cur.take(n.into())?;
                    self.unicode(bytes)?;
                }
                0x8d => {
                    let n = self.cur.u64_le()?;
                    let bytes = self.cur.len_u64(n)?;
                    self.unicode(bytes)?;
                }
                b'V' => {
                    let line = self.cur.line()?.to_string();
                    self.push_leaf(Value::Str(line));
                }
                // BINSTRING, SHORT_BINSTRING (Python 2 str)
                b'T' => {
                    let n = self.cur.i32_le()?;
                    let n =
                        u64::try_from(n).map_err(|_| "negative BINSTRING length".to_string())?;
                    let bytes = self.cur.len_u64(n)?;
                    self.string(bytes)?;
                }
                b'U' => {
                    let n = self.cur.u8()?;
                    let bytes = self.cur.take(n.into())?;
                    self.string(bytes)?;
                }
                // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                b'B' => {
                    let n = self.cur.u32_le()?;
                    let bytes = self.cur.len_u64(n.into())?;
                    self.push_leaf(Value::Bytes(bytes.to_vec()));
                }
                b'C' => {
                    let n = self.cur.u8()?;
                    let bytes = self.cur.take(n.into())?;
                    self.push_leaf(Value::Bytes(bytes.to_vec()));
                }
                0x8e | 0x96 => {
                    let n = self.cur.u64_le()?;
                    let bytes = self.cur.len_u64(n)?;
                    self.push_leaf(Value::Bytes(bytes.to_vec()));
                }
                // Tuples
                b')' => self.push_leaf(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_to_mark()?;
                    self.push_tuple(items)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(format!("pickle stack underflow at byte {at}"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    if items.iter().any(|i| i.value == Value::Mark) {
                        return Err(format!("TUPLE{n} over a MARK at byte {at}"));
                    }
                    self.push_tuple(items)?;
                }
                // Lists (and sets, kept as lists)
                b']' | 0x8f => self.push_leaf(Value::List(Vec::new())),
                b'l' | 0x91 => {
                    let items = self.pop_to_mark()?;
                    let values = items.iter().map(|n| n.value.clone()).collect();
                    self.push_container(Value::List(values), &items)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    self.append_items(vec![item])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_to_mark()?;
                    self.append_items(items)?;
                }
                // Dicts
                b'}' => self.push_leaf(Value::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_to_mark()?;
                    self.push_leaf(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_to_mark()?;
                    self.set_items(items)?;
                }
                // GLOBAL (text), STACK_GLOBAL
                b'c' => {
                    let module = self.cur.line()?.to_string();
                    let name = self.cur.line()?.to_string();
                    self.push_leaf(Value::Global { module, name });
                }
                0x93 => {
                    let name = self.pop()?.value;
                    let module = self.pop()?.value;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.push_leaf(Value::Global { module, name });
                        }
                        _ => return Err(format!("STACK_GLOBAL without strings at byte {at}")),
                    }
                }
                // REDUCE, NEWOBJ, NEWOBJ_EX: all kept as symbolic calls.
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.reduce(callable, args)?;
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.reduce(callable, args)?;
                }
                // BUILD: `state` sets attributes. On a dict (a state dict's
                // `_metadata`) attributes are not items, so it is dropped.
                b'b' => {
                    let state = self.pop()?;
                    let object = self.pop()?;
                    if matches!(object.value, Value::Dict(_)) {
                        self.stack.push(object);
                    } else {
                        let children = [object, state];
                        let node = Node::container(Value::Mark, &children)?;
                        let [object, state] = children;
                        self.stack.push(Node {
                            value: Value::Build {
                                object: Box::new(object.value),
                                state: Box::new(state.value),
                            },
                            ..node
                        });
                    }
                }
                // BINPERSID, PERSID (text)
                b'Q' => {
                    let id = self.pop()?;
                    let node = Node::container(Value::Mark, std::slice::from_ref(&id))?;
                    self.stack.push(Node {
                        value: Value::PersistentId(Box::new(id.value)),
                        ..node
                    });
                }
                b'P' => {
                    let id = self.cur.line()?.to_string();
                    self.push_leaf(Value::PersistentId(Box::new(Value::Str(id))));
                }
                // Memo: BINPUT, LONG_BINPUT, MEMOIZE, PUT (text)
                b'q' => {
                    let id = self.cur.u8()?;
                    self.memo_put(id.into())?;
                }
                b'r' => {
                    let id = self.cur.u32_le()?;
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len())
                        .map_err(|_| "pickle memo too large".to_string())?;
                    self.memo_put(id)?;
                }
                b'p' => {
                    let id = self.memo_id_line()?;
                    self.memo_put(id)?;
                }
                // Memo: BINGET, LONG_BINGET, GET (text)
                b'h' => {
                    let id = self.cur.u8()?;
                    self.memo_get(id.into())?;
                }
                b'j' => {
                    let id = self.cur.u32_le()?;
                    self.memo_get(id)?;
                }
                b'g' => {
                    let id = self.memo_id_line()?;
                    self.memo_get(id)?;
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode {other:#04x} at byte {at}"
                    ))
                }
            }
        }
    }

    fn push_tuple(&mut self, items: Vec<Node>) -> PResult<()> {
        let node = Node::container(Value::Mark, &items)?;
        self.stack.push(Node {
            value: Value::Tuple(items.into_iter().map(|n| n.value).collect()),
            ..node
        });
        Ok(())
    }

    fn memo_id_line(&mut self) -> PResult<u32> {
        let v = self.int_line()?;
        u32::try_from(v).map_err(|_| format!("bad memo index {v}"))
    }
}

// ---------------------------------------------------------------------------
// Interpreting the object: storages and tensor views.

/// The element types of torch's typed storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageKind {
    Float,
    Double,
    Half,
    BFloat16,
    Long,
    Int,
    Short,
    Char,
    Byte,
    Bool,
}

impl StorageKind {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::Float,
            "DoubleStorage" => Self::Double,
            "HalfStorage" => Self::Half,
            "BFloat16Storage" => Self::BFloat16,
            "LongStorage" => Self::Long,
            "IntStorage" => Self::Int,
            "ShortStorage" => Self::Short,
            "CharStorage" => Self::Char,
            "ByteStorage" => Self::Byte,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Float => "FloatStorage",
            Self::Double => "DoubleStorage",
            Self::Half => "HalfStorage",
            Self::BFloat16 => "BFloat16Storage",
            Self::Long => "LongStorage",
            Self::Int => "IntStorage",
            Self::Short => "ShortStorage",
            Self::Char => "CharStorage",
            Self::Byte => "ByteStorage",
            Self::Bool => "BoolStorage",
        }
    }

    fn elem_size(self) -> usize {
        match self {
            Self::Double | Self::Long => 8,
            Self::Float | Self::Int => 4,
            Self::Half | Self::BFloat16 | Self::Short => 2,
            Self::Char | Self::Byte | Self::Bool => 1,
        }
    }
}

/// One storage's bytes in the file.
#[derive(Debug)]
struct RawStorage<'a> {
    kind: StorageKind,
    count: usize,
    data: &'a [u8],
}

impl RawStorage<'_> {
    /// All elements as f32. Integer storages (e.g. BatchNorm's
    /// `num_batches_tracked`) are converted too, since a WeightMap is f32.
    fn decode(&self) -> PResult<Vec<f32>> {
        let d = self.data;
        let out = match self.kind {
            StorageKind::Float => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            StorageKind::Double => d
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            StorageKind::Half | StorageKind::BFloat16 => {
                // candle's conversion (the `half` crate) gets subnormals,
                // infinities and NaN right; no need for our own.
                let dtype = if self.kind == StorageKind::Half {
                    DType::F16
                } else {
                    DType::BF16
                };
                Tensor::from_raw_buffer(d, dtype, &[self.count], &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| format!("decoding {}: {e}", self.kind.name()))?
            }
            StorageKind::Long => d
                .chunks_exact(8)
                .map(|c| {
                    i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            StorageKind::Int => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            StorageKind::Short => d
                .chunks_exact(2)
                .map(|c| f32::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
            StorageKind::Char => d.iter().map(|&b| f32::from(b as i8)).collect(),
            StorageKind::Byte | StorageKind::Bool => d.iter().map(|&b| f32::from(b)).collect(),
        };
        Ok(out)
    }
}

/// A persistent storage reference: `('storage', torch.XStorage, key,
/// location, numel[, view_metadata])`.
#[derive(Debug, Clone)]
struct StorageRef {
    key: String,
    kind: StorageKind,
    /// Element offset and length of a legacy storage *view* (torch < 1.0
    /// could pickle views of a root storage); 0 and `numel` otherwise.
    view_offset: usize,
    view_len: usize,
}

impl StorageRef {
    fn parse(id: &Value) -> PResult<Self> {
        let fields = match id {
            Value::Tuple(fields) if fields.len() >= 5 => fields,
            other => {
                return Err(format!(
                    "persistent id is {}, expected ('storage', type, key, location, numel, ...)",
                    other.describe()
                ))
            }
        };
        if fields[0] != Value::Str("storage".to_string()) {
            return Err(format!(
                "persistent id of kind {}, expected 'storage'",
                fields[0].describe()
            ));
        }
        let kind = match &fields[1] {
            Value::Global { name, .. } => StorageKind::from_class(name)
                .ok_or_else(|| format!("unsupported storage type {name}"))?,
            other => return Err(format!("storage type is {}", other.describe())),
        };
        let key = match &fields[2] {
            Value::Str(key) => key.clone(),
            other => return Err(format!("storage key is {}", other.describe())),
        };
        let numel = as_usize(&fields[4], "storage size")?;
        let (view_offset, view_len) = match fields.get(5) {
            None | Some(Value::None) => (0, numel),
            Some(Value::Tuple(view)) if view.len() == 3 => (
                as_usize(&view[1], "view offset")?,
                as_usize(&view[2], "view size")?,
            ),
            Some(other) => return Err(format!("storage view metadata is {}", other.describe())),
        };
        Ok(Self {
            key,
            kind,
            view_offset,
            view_len,
        })
    }
}

/// A tensor: a strided view into a storage.
#[derive(Debug, Clone)]
struct TensorView {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorView {
    /// Parses `_rebuild_tensor_v2(storage, offset, size, stride, ...)` and the
    /// wrappers torch puts around it. `Ok(None)`: not a tensor.
    fn parse(value: &Value) -> PResult<Option<Self>> {
        let Value::Reduce { callable, args } = value else {
            return Ok(None);
        };
        let Value::Global { module, name } = callable.as_ref() else {
            return Ok(None);
        };
        let Value::Tuple(args) = args.as_ref() else {
            return Ok(None);
        };
        match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                if args.len() < 4 {
                    return Err(format!(
                        "{name} has {} arguments, expected at least 4",
                        args.len()
                    ));
                }
                let storage = match &args[0] {
                    Value::PersistentId(id) => StorageRef::parse(id)?,
                    other => return Err(format!("tensor storage is {}", other.describe())),
                };
                let offset = as_usize(&args[1], "storage offset")?;
                let size = as_usize_list(&args[2], "size")?;
                let stride = as_usize_list(&args[3], "stride")?;
                if size.len() != stride.len() {
                    return Err(format!(
                        "size {size:?} and stride {stride:?} have different ranks"
                    ));
                }
                Ok(Some(Self {
                    storage,
                    offset,
                    size,
                    stride,
                }))
            }
            // nn.Parameter(tensor, requires_grad, hooks[, state])
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match args.first() {
                    Some(inner) => Self::parse(inner),
                    None => Err(format!("{name} without arguments")),
                }
            }
            // Tensor subclasses: _rebuild_from_type_v2(func, type, args, state)
            ("torch._tensor", "_rebuild_from_type_v2") => match (args.first(), args.get(2)) {
                (Some(func), Some(inner_args)) => Self::parse(&Value::Reduce {
                    callable: Box::new(func.clone()),
                    args: Box::new(inner_args.clone()),
                }),
                _ => Err(format!("{name} with {} arguments", args.len())),
            },
            _ => Ok(None),
        }
    }

    /// Copies the viewed elements of `storage` into row-major order,
    /// after checking that the view stays inside the storage.
    fn gather(&self, storage: &[f32]) -> PResult<Vec<f32>> {
        let numel = self
            .size
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("size {:?} overflows", self.size))?;
        let base = self
            .storage
            .view_offset
            .checked_add(self.offset)
            .ok_or_else(|| "storage offset overflows".to_string())?;
        let limit = self
            .storage
            .view_offset
            .saturating_add(self.storage.view_len)
            .min(storage.len());
        if numel == 0 {
            return Ok(Vec::new());
        }
        let mut last = base;
        for (&n, &s) in self.size.iter().zip(&self.stride) {
            last = (n - 1)
                .checked_mul(s)
                .and_then(|span| last.checked_add(span))
                .ok_or_else(|| "view extent overflows".to_string())?;
        }
        if last >= limit {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {last}, but its \
                 storage `{}` holds {limit}",
                self.offset, self.size, self.stride, self.storage.key
            ));
        }
        // Fast path: a contiguous view is one slice.
        let mut expected = 1usize;
        let mut contiguous = true;
        for (&n, &s) in self.size.iter().zip(&self.stride).rev() {
            if n != 1 && s != expected {
                contiguous = false;
                break;
            }
            expected *= n;
        }
        if contiguous {
            return Ok(storage[base..base + numel].to_vec());
        }
        // General case: an odometer over the multi-index; every index was
        // bounded by `last` above.
        let rank = self.size.len();
        let mut out = Vec::with_capacity(numel);
        let mut index = vec![0usize; rank];
        let mut flat = base;
        for _ in 0..numel {
            out.push(storage[flat]);
            for dim in (0..rank).rev() {
                index[dim] += 1;
                flat += self.stride[dim];
                if index[dim] < self.size[dim] {
                    break;
                }
                flat -= self.stride[dim] * self.size[dim];
                index[dim] = 0;
            }
        }
        Ok(out)
    }
}

fn as_usize(value: &Value, what: &str) -> PResult<usize> {
    match value {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("{what} {i} is out of range")),
        other => Err(format!(
            "{what} is {}, expected an integer",
            other.describe()
        )),
    }
}

fn as_usize_list(value: &Value, what: &str) -> PResult<Vec<usize>> {
    match value {
        Value::Tuple(items) | Value::List(items) => {
            items.iter().map(|v| as_usize(v, what)).collect()
        }
        other => Err(format!("{what} is {}, expected a tuple", other.describe())),
    }
}

fn dict_get<'v>(items: &'v [(Value, Value)], key: &str) -> Option<&'v Value> {
    items
        .iter()
        .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
        .map(|(_, v)| v)
}

/// Records the type of every storage referenced anywhere in `value`: the
/// data section can only be walked knowing each storage's element size.
fn collect_storages(value: &Value, out: &mut HashMap<String, StorageKind>) -> PResult<()> {
    match value {
        Value::PersistentId(id) => {
            let storage = StorageRef::parse(id)?;
            match out.get(&storage.key) {
                Some(kind) if *kind != storage.kind => {
                    return Err(format!(
                        "storage `{}` is used both as {} and as {}",
                        storage.key,
                        kind.name(),
                        storage.kind.name()
                    ))
                }
                _ => {
                    out.insert(storage.key, storage.kind);
                }
            }
        }
        Value::Tuple(items) | Value::List(items) => {
            for item in items {
                collect_storages(item, out)?;
            }
        }
        Value::Dict(items) => {
            for (k, v) in items {
                collect_storages(k, out)?;
                collect_storages(v, out)?;
            }
        }
        Value::Reduce { callable, args } => {
            collect_storages(callable, out)?;
            collect_storages(args, out)?;
        }
        Value::Build { object, state } => {
            collect_storages(object, out)?;
            collect_storages(state, out)?;
        }
        Value::Mark
        | Value::None
        | Value::Bool(_)
        | Value::Int(_)
        | Value::Float(_)
        | Value::Str(_)
        | Value::Bytes(_)
        | Value::Global { .. } => {}
    }
    Ok(())
}

/// The (name, tensor view) pairs of a state dict, in file order. Entries
/// that are not tensors are skipped; `{"state_dict": {...}}` is unwrapped.
fn state_dict_entries(object: Value) -> PResult<Vec<(String, TensorView)>> {
    let Value::Dict(items) = object else {
        return Err(format!(
            "the pickled object is {}, expected a state dict",
            object.describe()
        ));
    };
    let mut entries = Vec::with_capacity(items.len());
    let mut nested = None;
    for (key, value) in items {
        let Value::Str(name) = key else {
            continue;
        };
        match TensorView::parse(&value).map_err(|e| format!("tensor `{name}`: {e}"))? {
            Some(view) => entries.push((name, view)),
            None if name == "state_dict" && matches!(value, Value::Dict(_)) => {
                nested = Some(value);
            }
            None => tracing::debug!(entry = %name, "skipping a non-tensor state-dict entry"),
        }
    }
    match nested {
        Some(inner) if entries.is_empty() => state_dict_entries(inner),
        _ => Ok(entries),
    }
}
