//! Mutations of valid inputs, byte-level for every format and token-level
//! for text ones. They aim where decoders break: length and count fields
//! (integers near the type limits, off by one), truncation at any point,
//! repeated and removed chunks, splices of two inputs, and in text the
//! delimiters, escapes, deep nesting and numbers out of range. A word
//! dictionary taken from the target's seeds (keys, kinds, tensor names)
//! lets mutations build structure the decoder recognises.

use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Integers that sit on the edges decoders get wrong.
const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    7,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// Tokens that break or stretch text formats.
const TEXT_TOKENS: [&str; 34] = [
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    ",",
    ":",
    "=",
    "\n",
    "\r\n",
    "\\",
    "\\u0000",
    "\u{0}",
    "\u{feff}",
    "#",
    "\"\"\"",
    "1e999",
    "-1",
    "-0",
    "0",
    "18446744073709551616",
    "NaN",
    "inf",
    "-inf",
    "null",
    "true",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "{a={a={a={a={a={a={a={a=",
    "../../../../etc/passwd",
    "/etc/passwd",
    "4294967296",
    "\u{10ffff}",
    "\t",
];

/// How many mutations a new input gets, at most.
const MAX_STACK: usize = 4;

/// Mutates copies of corpus inputs.
#[derive(Debug)]
pub struct Mutator {
    rng: ChaCha8Rng,
    text: bool,
    words: Vec<Vec<u8>>,
    max_len: usize,
}

impl Mutator {
    /// A mutator for a target (text: also token-level mutations), its
    /// dictionary taken from the seeds; inputs never grow past `max_len`.
    pub fn new(seed: u64, text: bool, seeds: &[Vec<u8>], max_len: usize) -> Self {
        use rand::SeedableRng;
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            text,
            words: dictionary(seeds),
            max_len,
        }
    }

    /// A new input: `base` with one to four mutations, `other` available
    /// for splicing.
    pub fn mutate(&mut self, base: &[u8], other: &[u8]) -> Vec<u8> {
        let mut out = base.to_vec();
        let n = self.rng.random_range(1..=MAX_STACK);
        for _ in 0..n {
            self.once(&mut out, other);
        }
        out.truncate(self.max_len);
        out
    }

    /// A uniform index below `len` (which must be positive).
    pub fn index(&mut self, len: usize) -> usize {
        self.position(len)
    }

    fn once(&mut self, out: &mut Vec<u8>, other: &[u8]) {
        let choices = if self.text { 14 } else { 11 };
        match self.rng.random_range(0..choices) {
            0 => self.flip_bit(out),
            1 => self.set_byte(out),
            2 | 3 => self.set_integer(out),
            4 => self.nudge_integer(out),
            5 => self.truncate(out),
            6 => self.remove_chunk(out),
            7 => self.repeat_chunk(out),
            8 => self.insert_random(out),
            9 => self.splice(out, other),
            10 => self.insert_word(out),
            11 => self.insert_text_token(out),
            12 => self.replace_number(out),
            _ => self.shuffle_lines(out),
        }
    }

    fn position(&mut self, len: usize) -> usize {
        if len == 0 {
            0
        } else {
            self.rng.random_range(0..len)
        }
    }

    fn flip_bit(&mut self, out: &mut [u8]) {
        if !out.is_empty() {
            let at = self.position(out.len());
            out[at] ^= 1 << self.rng.random_range(0..8);
        }
    }

    fn set_byte(&mut self, out: &mut [u8]) {
        if !out.is_empty() {
            let at = self.position(out.len());
            out[at] = [0u8, 1, 0x7f, 0x80, 0xff, b'0', b'9', b'"'][self.rng.random_range(0..8)];
        }
    }

    /// Writes an interesting 1-, 2-, 4- or 8-byte little-endian integer,
    /// often at an aligned offset (where binary headers keep their fields).
    fn set_integer(&mut self, out: &mut [u8]) {
        let width = [1usize, 2, 4, 8][self.rng.random_range(0..4)];
        if out.len() < width {
            return;
        }
        let mut at = self.position(out.len() - width + 1);
        if self.rng.random_bool(0.5) {
            at -= at % width;
        }
        let value = INTERESTING[self.rng.random_range(0..INTERESTING.len())];
        out[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    }

    /// Adds or takes a little from a 4- or 8-byte little-endian field:
    /// lengths and counts off by one or a few.
    fn nudge_integer(&mut self, out: &mut [u8]) {
        let width = if self.rng.random_bool(0.5) { 4 } else { 8 };
        if out.len() < width {
            return;
        }
        let at = self.position(out.len() - width + 1);
        let mut bytes = [0u8; 8];
        bytes[..width].copy_from_slice(&out[at..at + width]);
        let delta = self.rng.random_range(1..=16u64);
        let value = if self.rng.random_bool(0.5) {
            u64::from_le_bytes(bytes).wrapping_add(delta)
        } else {
            u64::from_le_bytes(bytes).wrapping_sub(delta)
        };
        out[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    }

    fn truncate(&mut self, out: &mut Vec<u8>) {
        let at = self.position(out.len());
        out.truncate(at);
    }

    fn chunk(&mut self, len: usize) -> (usize, usize) {
        let start = self.position(len);
        let max = (len - start).min(256);
        let size = if max == 0 {
            0
        } else {
            self.rng.random_range(1..=max)
        };
        (start, start + size)
    }

    fn remove_chunk(&mut self, out: &mut Vec<u8>) {
        if !out.is_empty() {
            let (start, end) = self.chunk(out.len());
            out.drain(start..end);
        }
    }

    fn repeat_chunk(&mut self, out: &mut Vec<u8>) {
        if !out.is_empty() {
            let (start, end) = self.chunk(out.len());
            let piece = out[start..end].to_vec();
            let times = self.rng.random_range(1..=8);
            let at = self.position(out.len() + 1);
            for _ in 0..times {
                out.splice(at..at, piece.iter().copied());
            }
        }
    }

    fn insert_random(&mut self, out: &mut Vec<u8>) {
        let at = self.position(out.len() + 1);
        let n = self.rng.random_range(1..=16);
        let bytes: Vec<u8> = (0..n).map(|_| self.rng.random()).collect();
        out.splice(at..at, bytes);
    }

    /// Keeps a prefix of this input and continues with a suffix of another.
    fn splice(&mut self, out: &mut Vec<u8>, other: &[u8]) {
        if other.is_empty() {
            return;
        }
        let keep = self.position(out.len() + 1);
        let from = self.position(other.len());
        out.truncate(keep);
        out.extend_from_slice(&other[from..]);
    }

    fn insert_word(&mut self, out: &mut Vec<u8>) {
        if let Some(word) = self.words.choose(&mut self.rng).cloned() {
            let at = self.position(out.len() + 1);
            if self.rng.random_bool(0.5) && at + word.len() <= out.len() {
                out[at..at + word.len()].copy_from_slice(&word);
            } else {
                out.splice(at..at, word);
            }
        }
    }

    fn insert_text_token(&mut self, out: &mut Vec<u8>) {
        let token = TEXT_TOKENS[self.rng.random_range(0..TEXT_TOKENS.len())];
        let repeat = if self.rng.random_bool(0.1) {
            self.rng.random_range(2..=2000)
        } else {
            1
        };
        let at = self.position(out.len() + 1);
        let bytes = token.as_bytes().repeat(repeat);
        out.splice(at..at, bytes);
    }

    /// Replaces a run of digits with an interesting number.
    fn replace_number(&mut self, out: &mut Vec<u8>) {
        let starts: Vec<usize> = (0..out.len())
            .filter(|&i| out[i].is_ascii_digit() && (i == 0 || !out[i - 1].is_ascii_digit()))
            .collect();
        let Some(&start) = starts.choose(&mut self.rng) else {
            return;
        };
        let end = (start..out.len())
            .find(|&i| !out[i].is_ascii_digit())
            .unwrap_or(out.len());
        let value = match self.rng.random_range(0..4) {
            0 => INTERESTING[self.rng.random_range(0..INTERESTING.len())].to_string(),
            1 => "-1".to_string(),
            2 => "1e308".to_string(),
            _ => self.rng.random_range(0..1000u32).to_string(),
        };
        out.splice(start..end, value.into_bytes());
    }

    /// Duplicates, drops or swaps whole lines.
    fn shuffle_lines(&mut self, out: &mut Vec<u8>) {
        let mut lines: Vec<Vec<u8>> = out.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        if lines.is_empty() {
            return;
        }
        let i = self.position(lines.len());
        let j = self.position(lines.len());
        match self.rng.random_range(0..3) {
            0 => {
                let line = lines[i].clone();
                lines.insert(j, line);
            }
            1 => {
                lines.remove(i);
            }
            _ => lines.swap(i, j),
        }
        *out = lines.join(&b'\n');
    }
}

/// Words of the seeds: runs of at least three letters, digits, `_`, `-`,
/// `.` (keys, kinds, tensor and metadata names), at most 256 of them.
fn dictionary(seeds: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut words = std::collections::BTreeSet::new();
    for seed in seeds {
        for word in seed.split(|b| !(b.is_ascii_alphanumeric() || b"_-.".contains(b))) {
            if (3..=48).contains(&word.len()) && word.iter().any(u8::is_ascii_alphabetic) {
                words.insert(word.to_vec());
            }
        }
    }
    words.into_iter().take(256).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_bounded() {
        let seeds = vec![b"{\"image\": \"a.png\", \"caption\": \"x 12\"}\n".to_vec()];
        let run = |seed| {
            let mut m = Mutator::new(seed, true, &seeds, 64);
            (0..200)
                .map(|_| m.mutate(&seeds[0], &seeds[0]))
                .collect::<Vec<_>>()
        };
        let a = run(1);
        assert_eq!(a, run(1));
        assert_ne!(a, run(2));
        assert!(a.iter().all(|x| x.len() <= 64));
        // Mutations change the input, most of the time.
        assert!(
            a.iter()
                .filter(|x| x.as_slice() != seeds[0].as_slice())
                .count()
                > 150
        );
        assert!(dictionary(&seeds).contains(&b"caption".to_vec()));
    }
}
