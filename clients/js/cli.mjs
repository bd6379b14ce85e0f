#!/usr/bin/env node
// rwkv-deploy's JavaScript client: run, score and check an export folder on onnxruntime-node or onnxruntime-web.
//
//   node cli.mjs run OUT --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P] [--seed S] [--runtime node|web]
//   node cli.mjs score OUT --tokens 1,2,3 [--runtime node|web]
//   node cli.mjs check OUT [--runtime node|web]
//   node cli.mjs tokenize --tokenizer FILE [--kind rwkv-world|hf-tokenizers]   (texts or {"ids": [...]} on stdin)
//   node cli.mjs batch                                                           (many commands in one process)
//
// Bad input is one `error: ...` line on stderr and exit 2; `check` exits 1 on FAIL; 70 is a bug (with its stack
// trace). See README.md.
import { parseArgs } from 'node:util';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  RwkvError, RUNTIMES, openExport, score, check, generate, GenerationStats, checkOptions, loadTokenizer, tokenizerKind,
  TextStream,
} from './src/node.mjs';

const USAGE = `usage: node cli.mjs run OUT --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P] [--seed S] [--runtime node|web]
       node cli.mjs score OUT --tokens 1,2,3 [--runtime node|web]
       node cli.mjs check OUT [--runtime node|web]
       node cli.mjs tokenize --tokenizer FILE [--kind rwkv-world|hf-tokenizers] < inputs
       node cli.mjs batch < commands
options of run, score and check: --runtime node (onnxruntime-node, native CPU; the default) or web
(onnxruntime-web, wasm); --threads N (intra-op threads; web: wasm threads, 1 unless given)`;

const COMMON = { runtime: { type: 'string', default: 'node' }, threads: { type: 'string' } };
const COMMANDS = {
  run: {
    ...COMMON, prompt: { type: 'string' }, 'max-tokens': { type: 'string', default: '100' },
    temperature: { type: 'string', default: '1.0' }, 'top-p': { type: 'string', default: '0.85' }, seed: { type: 'string' },
  },
  score: { ...COMMON, tokens: { type: 'string' } },
  check: { ...COMMON },
  tokenize: { tokenizer: { type: 'string' }, kind: { type: 'string' } },
  batch: {},
};

function parse(argv) {
  const [command, ...rest] = argv;
  if (command === '-h' || command === '--help') return { command: 'help' };
  if (!command) throw new RwkvError(`expected a command: ${Object.keys(COMMANDS).join(', ')} (--help for usage)`);
  if (!(command in COMMANDS)) throw new RwkvError(`unknown command ${JSON.stringify(command)}; expected one of ${Object.keys(COMMANDS).join(', ')}`);
  let parsed;
  try {
    parsed = parseArgs({ args: rest, options: COMMANDS[command], allowPositionals: true, strict: true });
  } catch (e) {
    throw new RwkvError(`${command}: ${e.message}`);
  }
  const { values, positionals } = parsed;
  const wantsFolder = !['tokenize', 'batch'].includes(command);
  if (positionals.length !== (wantsFolder ? 1 : 0)) {
    throw new RwkvError(wantsFolder ? `${command} needs one export folder (OUT), got ${positionals.length} positional arguments`
      : `${command} takes no positional arguments`);
  }
  if (values.runtime !== undefined && !RUNTIMES.includes(values.runtime)) {
    throw new RwkvError(`unknown --runtime ${JSON.stringify(values.runtime)}; expected one of ${RUNTIMES.join(', ')}`);
  }
  return { command, folder: positionals[0], values };
}

function integer(text, name, min = 0) {
  if (!/^\s*\d+\s*$/.test(text ?? '')) throw new RwkvError(`${name} must be an integer >= ${min}, got ${JSON.stringify(text)}`);
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < min) throw new RwkvError(`${name} must be an integer >= ${min}, got ${JSON.stringify(text)}`);
  return n;
}

function number(text, name) {
  const n = Number(text);
  if (text === undefined || String(text).trim() === '' || !Number.isFinite(n)) throw new RwkvError(`${name} must be a number, got ${JSON.stringify(text)}`);
  return n;
}

export function parseTokens(text) {
  if (text === undefined) throw new RwkvError('score needs --tokens, e.g. --tokens 1,2,3');
  const parts = text.split(',');
  if (!text.trim() || parts.some((p) => !/^\s*\d+\s*$/.test(p))) {
    throw new RwkvError(`--tokens must be comma-separated non-negative integer ids, e.g. 1,2,3; got ${JSON.stringify(text.slice(0, 100))}`);
  }
  return parts.map((p) => {
    const n = Number(p);
    if (!Number.isSafeInteger(n)) throw new RwkvError(`--tokens: ${p.trim()} is not a token id`);
    return n;
  });
}

function sessionArgs(values) {
  return { runtime: values.runtime, threads: values.threads === undefined ? undefined : integer(values.threads, '--threads', 1) };
}

/** Split stdin into inputs: a JSON array of items, or one JSON value per line. */
function parseInputs(text) {
  const t = text.trim();
  if (!t) return [];
  if (t.startsWith('[')) {
    try {
      const all = JSON.parse(t);
      if (Array.isArray(all)) return all;
    } catch { /* JSON lines whose first item is an array */ }
  }
  return t.split('\n').filter((l) => l.trim()).map((l, i) => {
    try {
      return JSON.parse(l);
    } catch (e) {
      throw new RwkvError(`stdin line ${i + 1} is not JSON (${e.message})`);
    }
  });
}

async function tokenizeCommand(values, io) {
  if (!values.tokenizer) throw new RwkvError('tokenize needs --tokenizer FILE');
  const kind = values.kind ?? tokenizerKind(values.tokenizer);
  let text;
  try {
    text = fs.readFileSync(values.tokenizer, 'utf8');
  } catch (e) {
    throw new RwkvError(`cannot read the tokenizer file ${values.tokenizer} (${e.code || e.message})`);
  }
  const tok = await loadTokenizer(text, kind, values.tokenizer);
  io.err(`tokenizer: ${tok.kind}, ${tok.vocabSize} ids\n`);
  for (const item of parseInputs(await io.stdin())) {
    let out;
    try {
      let ids;
      if (typeof item === 'string') ids = tok.encode(item);
      else if (item && Array.isArray(item.ids)) ids = item.ids;
      else throw new RwkvError('each input must be a string (to encode) or {"ids": [...]} (to decode)');
      const stream = new TextStream(tok);
      const pieces = ids.map((id) => stream.push(id));
      pieces.push(stream.finish());
      out = { ids, pieces, text: pieces.join(''), decoded: tok.decode(ids), bytes: Buffer.from(tok.decodeBytes(ids)).toString('hex') };
    } catch (e) {
      if (!(e instanceof RwkvError)) throw e;
      out = { error: e.message };
    }
    io.out(`${JSON.stringify(out)}\n`);
  }
  return 0;
}

async function batchCommand(io) {
  // A test and tooling helper: each stdin line is a JSON argv array (or {"argv": [...], "stdin": "..."}); each
  // command runs in this process through the same code as the command line, and one JSON line
  // {"rc", "stdout", "stderr"} comes out per command (saves starting node and ONNX Runtime every time).
  for (const item of parseInputs(await io.stdin())) {
    const argv = Array.isArray(item) ? item : item.argv;
    const out = [];
    const err = [];
    const sub = { out: (s) => out.push(s), err: (s) => err.push(s), stdin: async () => (item.stdin ?? '') };
    let rc;
    if (!Array.isArray(argv) || argv[0] === 'batch') {
      err.push('error: each batch line must be a JSON argv array (or {"argv": [...], "stdin": "..."}), not batch itself\n');
      rc = 2;
    } else {
      try {
        rc = await main(argv.map(String), sub);
      } catch (e) { // a bug, not bad input: keep the stack
        err.push(`${e.stack || e}\n`);
        rc = 70;
      }
    }
    io.out(`${JSON.stringify({ rc, stdout: out.join(''), stderr: err.join('') })}\n`);
  }
  return 0;
}

async function withSession(folder, values, fn) {
  const session = await openExport(folder, sessionArgs(values));
  try {
    return await fn(session);
  } finally {
    await session.release();
  }
}

async function dispatch(argv, io) {
  const { command, folder, values } = parse(argv);
  if (command === 'help') {
    io.out(`${USAGE}\n`);
    return 0;
  }
  if (command === 'tokenize') return tokenizeCommand(values, io);
  if (command === 'batch') return batchCommand(io);
  if (command === 'score') {
    const tokens = parseTokens(values.tokens);
    return withSession(folder, values, async (session) => {
      const rows = await score(session, tokens);
      io.out(`[${rows.map((r) => `[${Array.from(r).join(',')}]`).join(',')}]\n`);
      return 0;
    });
  }
  if (command === 'check') {
    return withSession(folder, values, async (session) => {
      const result = await check(session);
      io.out(`${folder} on ${values.runtime === 'web' ? 'onnxruntime-web (wasm)' : 'onnxruntime-node (cpu)'}\n${result.table()}\n`);
      return result.passed ? 0 : 1;
    });
  }
  // run
  if (values.prompt === undefined) throw new RwkvError('run needs --prompt TEXT');
  const options = {
    maxTokens: integer(values['max-tokens'], '--max-tokens'),
    temperature: number(values.temperature, '--temperature'),
    topP: number(values['top-p'], '--top-p'),
    seed: values.seed === undefined ? null : integer(values.seed, '--seed'),
  };
  checkOptions(options);
  return withSession(folder, values, async (session) => {
    await session.tokenizer(); // a folder without a tokenizer is bad input, before anything is printed
    const stats = new GenerationStats();
    for await (const piece of generate(session, values.prompt, { ...options, stats })) io.out(piece);
    io.out('\n');
    io.err(`${stats.line()}\n`);
    return 0;
  });
}

/** Run one command line; returns the exit status. Bad input is one `error:` line and 2. */
export async function main(argv, io) {
  try {
    return await dispatch(argv, io);
  } catch (e) {
    if (e instanceof RwkvError) {
      io.err(`error: ${e.message.replace(/\n/g, ' ')}\n`);
      return 2;
    }
    throw e;
  }
}

async function readStdin() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return Buffer.concat(chunks).toString('utf8');
}

if (process.argv[1] && fs.realpathSync(process.argv[1]) === fs.realpathSync(fileURLToPath(import.meta.url))) {
  const io = { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s), stdin: readStdin };
  try {
    process.exitCode = await main(process.argv.slice(2), io);
  } catch (e) { // not bad input but a bug: the stack trace, and 70 (EX_SOFTWARE) rather than check's FAIL (1)
    process.stderr.write(`${e && e.stack ? e.stack : e}\n`);
    process.exitCode = 70;
  }
}
