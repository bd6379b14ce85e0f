// Tokenizers, mirroring rwkv_deploy/runtime/tokenizer.py: the RWKV World vocabulary (greedy longest match over
// UTF-8 bytes through a trie, spec §9) and Hugging Face tokenizers JSON files (through @huggingface/tokenizers,
// loaded on first use). Both give encode(text) -> ids, decodeBytes(ids) -> Uint8Array, decode(ids) -> string,
// vocabSize and bytesPerToken (see stream.mjs).
import { RwkvError } from './errors.mjs';

const utf8 = new TextEncoder();

// ---- Python string / bytes literals (the World vocabulary spells each token as one) ----------------------------

const SIMPLE_ESCAPES = { '\\': 0x5c, "'": 0x27, '"': 0x22, a: 0x07, b: 0x08, f: 0x0c, n: 0x0a, r: 0x0d, t: 0x09, v: 0x0b };

/**
 * The bytes of one Python str or bytes literal, as ast.literal_eval reads it and Python encodes a str (UTF-8):
 * prefixes b/r/u (any case, rb/br), single, double and triple quotes, escapes \\ \' \" \a \b \f \n \r \t \v,
 * octal \ooo, \xhh, and (str only) \uXXXX, \UXXXXXXXX; an unknown escape keeps its backslash; \N{...} (named
 * characters) is not supported. A str whose UTF-8 does not exist (a lone surrogate) is an error, as in Python.
 */
export function pythonLiteralBytes(lit) {
  const m = /^([rRbBuU]{0,2})('''|"""|'|")/.exec(lit);
  if (!m) throw new Error(`${lit} is neither a str nor a bytes literal`);
  const prefix = m[1].toLowerCase();
  if (!['', 'b', 'r', 'u', 'br', 'rb'].includes(prefix)) throw new Error(`${lit}: unknown string prefix ${m[1]}`);
  const isBytes = prefix.includes('b');
  const raw = prefix.includes('r');
  const quote = m[2];
  if (lit.length < m[0].length + quote.length || !lit.endsWith(quote)) throw new Error(`${lit} is not a closed literal`);
  const body = lit.slice(m[0].length, lit.length - quote.length);
  const out = []; // bytes for b'', code points for str
  const push = (cp) => out.push(cp);
  for (let i = 0; i < body.length;) {
    const cp = body.codePointAt(i);
    const ch = String.fromCodePoint(cp);
    i += ch.length;
    if (isBytes && cp > 0x7f) throw new Error(`${lit}: bytes can only contain ASCII literal characters`);
    if (ch === quote[0] && quote.length === 1) throw new Error(`${lit}: unescaped quote inside the literal`);
    if (ch === '\n' && quote.length === 1) throw new Error(`${lit}: unterminated string literal`);
    if (ch !== '\\') {
      push(cp);
      continue;
    }
    if (i >= body.length) throw new Error(`${lit}: the literal ends with a backslash`);
    const e = body[i];
    if (raw) { // a raw literal keeps the backslash and the next character (which cannot end it)
      push(0x5c);
      push(body.codePointAt(i));
      i += String.fromCodePoint(body.codePointAt(i)).length;
      continue;
    }
    i += 1;
    if (e in SIMPLE_ESCAPES) push(SIMPLE_ESCAPES[e]);
    else if (e === '\n') { /* line continuation */ } else if (e >= '0' && e <= '7') {
      let s = e;
      while (s.length < 3 && i < body.length && body[i] >= '0' && body[i] <= '7') s += body[i++];
      const v = parseInt(s, 8);
      if (isBytes) push(v & 0xff);
      else push(v);
    } else if (e === 'x' || (!isBytes && (e === 'u' || e === 'U'))) {
      const n = { x: 2, u: 4, U: 8 }[e];
      const hex = body.slice(i, i + n);
      if (hex.length !== n || !/^[0-9a-fA-F]+$/.test(hex)) throw new Error(`${lit}: truncated \\${e} escape`);
      const v = parseInt(hex, 16);
      if (v > 0x10ffff) throw new Error(`${lit}: illegal Unicode character`);
      push(v);
      i += n;
    } else if (e === 'N' && !isBytes) {
      throw new Error(`${lit}: named Unicode escapes (\\N{...}) are not supported`);
    } else {
      push(0x5c); // unknown escape: the backslash stays
      i -= 1;
    }
  }
  if (isBytes) return Uint8Array.from(out);
  for (const cp of out) {
    if (cp >= 0xd800 && cp <= 0xdfff) throw new Error(`${lit}: a lone surrogate has no UTF-8 encoding`);
  }
  return utf8.encode(String.fromCodePoint(...out));
}

// ---- RWKV World --------------------------------------------------------------------------------------------

export class WorldTokenizer {
  static kind = 'rwkv-world';

  /** `text`: the contents of rwkv_vocab_v20230424.txt, lines `<id> <python literal> <byte length>`. */
  constructor(text, where = 'RWKV World vocabulary') {
    this.kind = WorldTokenizer.kind;
    this.bytesPerToken = true;
    this.idToBytes = new Map();
    // trie: node = Map(byte -> [child node, token id or -1])
    this.trie = new Map();
    // the line breaks of Python's str.splitlines
    const lines = text.split(/\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]/);
    let maxId = -1;
    lines.forEach((line, n) => {
      if (!line.trim()) return;
      let idx;
      let tok;
      try {
        const a = line.indexOf(' ');
        const b = line.lastIndexOf(' ');
        if (a < 0 || b <= a) throw new Error('expected `<id> <literal> <length>`');
        if (!/^\s*[+-]?\d+\s*$/.test(line.slice(0, a)) || !/^\s*[+-]?\d+\s*$/.test(line.slice(b + 1))) {
          throw new Error('the id and the length must be integers');
        }
        idx = parseInt(line.slice(0, a), 10);
        const length = parseInt(line.slice(b + 1), 10);
        tok = pythonLiteralBytes(line.slice(a + 1, b));
        if (tok.length !== length) throw new Error(`token ${idx} has ${tok.length} bytes, the file says ${length}`);
      } catch (e) {
        throw new RwkvError(`${where}:${n + 1}: not an RWKV World vocabulary line (${e.message})`);
      }
      this.idToBytes.set(idx, tok);
      if (idx > maxId) maxId = idx;
      let node = this.trie;
      tok.forEach((byte, i) => {
        let entry = node.get(byte);
        if (!entry) {
          entry = [new Map(), -1];
          node.set(byte, entry);
        }
        if (i === tok.length - 1) entry[1] = idx;
        node = entry[0];
      });
    });
    if (!this.idToBytes.size) throw new RwkvError(`${where} has no tokens; expected an RWKV World vocabulary`);
    this.vocabSize = maxId + 1;
  }

  encode(text) {
    const src = utf8.encode(text);
    const ids = [];
    let i = 0;
    while (i < src.length) {
      let node = this.trie;
      let j = i;
      let best = -1;
      let bestEnd = i;
      while (j < src.length) { // walk as deep as the bytes allow, remember the last token
        const entry = node.get(src[j]);
        if (!entry) break;
        node = entry[0];
        j += 1;
        if (entry[1] >= 0) {
          best = entry[1];
          bestEnd = j;
        }
      }
      if (best < 0) throw new RwkvError(`byte 0x${src[i].toString(16)} has no token in this vocabulary`);
      ids.push(best);
      i = bestEnd;
    }
    return ids;
  }

  tokenBytes(id) {
    if (id === 0) return new Uint8Array(0); // end of text
    const b = Number.isInteger(id) ? this.idToBytes.get(id) : undefined;
    if (b === undefined) { // a silent '' would drop text (models have more logits than the vocabulary has ids)
      throw new RwkvError(`token id ${id} is not in the RWKV World vocabulary (ids 1..${this.vocabSize - 1}, 0 = end of text)`);
    }
    return b;
  }

  decodeBytes(ids) {
    return concatBytes(ids.map((i) => this.tokenBytes(i)));
  }

  decode(ids) {
    return new TextDecoder('utf-8').decode(this.decodeBytes(ids));
  }
}

export function concatBytes(parts) {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

// ---- Hugging Face tokenizers JSON --------------------------------------------------------------------------------

/** GPT-2's bytes_to_unicode, inverted: the character that stands for each byte in byte-level BPE vocabularies. */
function byteLevelAlphabet() {
  const printable = new Set();
  for (let b = 0x21; b <= 0x7e; b++) printable.add(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.add(b);
  for (let b = 0xae; b <= 0xff; b++) printable.add(b);
  const table = new Map();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (printable.has(b)) table.set(String.fromCharCode(b), b);
    else table.set(String.fromCharCode(256 + n++), b);
  }
  return table;
}

const BYTE_OF_CHAR = byteLevelAlphabet();

/** A ByteLevel decoder, or a Sequence of nothing but ByteLevel decoders (rwkv_deploy's _is_byte_level). */
function isByteLevel(decoder) {
  if (!decoder) return false;
  if (decoder.type === 'Sequence') {
    const parts = decoder.decoders || [];
    return parts.length > 0 && parts.every(isByteLevel);
  }
  return decoder.type === 'ByteLevel';
}

let hfModule = null;
async function hfTokenizers() {
  if (!hfModule) {
    try {
      hfModule = await import('@huggingface/tokenizers');
    } catch (e) {
      throw new RwkvError(`@huggingface/tokenizers is needed for this export and could not be loaded (${e.message}); ` +
        'run `npm ci` in clients/js');
    }
  }
  return hfModule;
}

export class HFTokenizer {
  static kind = 'hf-tokenizers';

  /** Use HFTokenizer.load(text): the library is imported asynchronously. */
  constructor(lib, json, where) {
    this.kind = HFTokenizer.kind;
    try {
      this.tok = new lib.Tokenizer(json, { clean_up_tokenization_spaces: false });
    } catch (e) {
      throw new RwkvError(`${where} is not a tokenizers JSON file the JavaScript tokenizers library can load (${String(e.message).slice(0, 200)})`);
    }
    this.vocabSize = this.tok.get_vocab(true).size;
    this.bytesPerToken = isByteLevel(json.decoder);
    this.added = new Map();
    for (const [id, t] of this.tok.get_added_tokens_decoder()) this.added.set(Number(id), utf8.encode(t.content));
    this.cache = new Map();
  }

  static async load(text, where = 'tokenizer file') {
    let json;
    try {
      json = JSON.parse(text);
    } catch (e) {
      throw new RwkvError(`${where} is not a tokenizers JSON file (${String(e.message).slice(0, 200)})`);
    }
    if (!json || typeof json !== 'object' || !json.model) throw new RwkvError(`${where} is not a tokenizers JSON file (no model)`);
    return new HFTokenizer(await hfTokenizers(), json, where);
  }

  encode(text) {
    return Array.from(this.tok.encode(text).ids, Number);
  }

  token(id) {
    const s = Number.isInteger(id) && id >= 0 ? this.tok.id_to_token(id) : undefined;
    if (s === undefined || s === null) { // the library itself skips unknown ids silently, which would drop text
      throw new RwkvError(`token id ${id} is not in this tokenizer's vocabulary (${this.vocabSize} tokens)`);
    }
    return s;
  }

  tokenBytes(id) {
    let b = this.cache.get(id);
    if (b === undefined) {
      const s = this.token(id);
      b = this.added.get(id);
      if (b === undefined) {
        const out = [];
        for (const c of s) { // a character outside the alphabet: its own UTF-8, as the ByteLevel decoder does
          const byte = BYTE_OF_CHAR.get(c);
          if (byte === undefined) {
            b = utf8.encode(s);
            break;
          }
          out.push(byte);
        }
        if (b === undefined) b = Uint8Array.from(out);
      }
      this.cache.set(id, b);
    }
    return b;
  }

  decodeBytes(ids) {
    if (this.bytesPerToken) return concatBytes(ids.map((i) => this.tokenBytes(i)));
    for (const i of ids) this.token(i); // only to reject unknown ids
    return utf8.encode(this.tok.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false }));
  }

  decode(ids) {
    return new TextDecoder('utf-8').decode(this.decodeBytes(ids));
  }
}

export const KINDS = [WorldTokenizer.kind, HFTokenizer.kind];

/** By file name, as the Python runtime: *.json is an HF tokenizers file, *.txt an RWKV World vocabulary. */
export function tokenizerKind(file) {
  if (/\.json$/.test(file)) return HFTokenizer.kind;
  if (/\.txt$/.test(file)) return WorldTokenizer.kind;
  throw new RwkvError(`${file}: unknown tokenizer file type; expected a tokenizers .json or an RWKV World .txt`);
}

/** A tokenizer from the text of its file. */
export async function loadTokenizer(text, kind, where) {
  if (kind === WorldTokenizer.kind) return new WorldTokenizer(text, where);
  if (kind === HFTokenizer.kind) return HFTokenizer.load(text, where);
  throw new RwkvError(`unknown tokenizer kind ${JSON.stringify(kind)} for ${where}; known kinds: ${KINDS.join(', ')}`);
}
