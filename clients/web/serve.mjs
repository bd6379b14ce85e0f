#!/usr/bin/env node
// Serves the generation page, the client library, ONNX Runtime Web and export folders, read-only, on 127.0.0.1.
//
//   node clients/web/serve.mjs --export OUT [--export OUT2 ...] [--port 8080]
//
// Routes (GET and HEAD only):
//   /                      the page (clients/web/index.html; ?export=exports/N/ picks another folder)
//   /app/...               clients/web/
//   /lib/...               clients/js/src/ (the same library the Node CLI uses)
//   /node_modules/...      onnxruntime-web/dist and @huggingface/tokenizers/dist from clients/js/node_modules
//   /export/...            the first --export folder
//   /exports/N/...         the N-th --export folder (0-based)
// A request whose path climbs out of its root (`..`, encoded or not) or reaches a file through a symlink that
// leads out of it is refused (404); nothing else of the disk is reachable. The page is served cross-origin
// isolated (COOP/COEP) so that ONNX Runtime Web may use wasm threads.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const JS = path.resolve(HERE, '..', 'js');

const TYPES = {
  '.html': 'text/html; charset=utf-8', '.mjs': 'text/javascript; charset=utf-8', '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8', '.json': 'application/json', '.wasm': 'application/wasm', '.txt': 'text/plain; charset=utf-8',
  '.png': 'image/png', '.map': 'application/json', '.onnx': 'application/octet-stream', '.bin': 'application/octet-stream',
  '.data': 'application/octet-stream', '.so': 'application/octet-stream',
};

function fail(message) {
  process.stderr.write(`error: ${message}\n`);
  process.exit(2);
}

let args;
try {
  args = parseArgs({
    options: { export: { type: 'string', multiple: true }, port: { type: 'string', default: '8080' }, host: { type: 'string', default: '127.0.0.1' } },
    strict: true,
  }).values;
} catch (e) {
  fail(e.message);
}
const exports = (args.export || []).map((p) => path.resolve(p));
if (!exports.length) fail('serve.mjs needs --export OUT (an rwkv-deploy export folder)');
for (const dir of exports) {
  if (!fs.existsSync(path.join(dir, 'manifest.json'))) fail(`${dir} has no manifest.json; it is not an rwkv-deploy export folder`);
}
if (!/^\d+$/.test(args.port) || Number(args.port) > 65535) fail(`--port must be a port number, got ${JSON.stringify(args.port)}`);
if (!['127.0.0.1', 'localhost', '::1'].includes(args.host)) fail('serve.mjs binds to the loopback interface only (--host 127.0.0.1)');

const ortDist = path.join(JS, 'node_modules', 'onnxruntime-web', 'dist');
const tokDist = path.join(JS, 'node_modules', '@huggingface', 'tokenizers', 'dist');
if (!fs.existsSync(ortDist)) fail(`${ortDist} is missing: run \`cd clients/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci\``);

// mount prefix -> root directory (longest prefix first)
const MOUNTS = [
  ['/node_modules/onnxruntime-web/dist/', ortDist],
  ['/node_modules/@huggingface/tokenizers/dist/', tokDist],
  ['/lib/', path.join(JS, 'src')],
  ['/app/', HERE],
  ['/export/', exports[0]],
  ...exports.map((dir, i) => [`/exports/${i}/`, dir]),
];
const ROOTS = new Map(MOUNTS.map(([, dir]) => [dir, fs.realpathSync(dir)]));

/** The file for a URL path, or null: decoded segments, none of them `.`/`..`/empty or holding a separator, and
 * the real path (symlinks followed) inside the mount's real root. */
function resolve(urlPath) {
  if (urlPath === '/' || urlPath === '/index.html') return path.join(HERE, 'index.html');
  const mount = MOUNTS.find(([prefix]) => urlPath.startsWith(prefix));
  if (!mount) return null;
  const [prefix, dir] = mount;
  let parts;
  try {
    parts = urlPath.slice(prefix.length).split('/').map(decodeURIComponent);
  } catch {
    return null;
  }
  if (!parts.length || parts.some((p) => p === '' || p === '.' || p === '..' || /[/\\\0]/.test(p))) return null;
  let real;
  try {
    real = fs.realpathSync(path.join(dir, ...parts));
  } catch {
    return null;
  }
  const back = path.relative(ROOTS.get(dir), real);
  if (!back || back.startsWith('..') || path.isAbsolute(back)) return null;
  return fs.statSync(real).isFile() ? real : null;
}

const server = http.createServer((req, res) => {
  const headers = {
    'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp',
    'Cross-Origin-Resource-Policy': 'same-origin', 'X-Content-Type-Options': 'nosniff', 'Cache-Control': 'no-cache',
  };
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.writeHead(405, { ...headers, Allow: 'GET, HEAD' }).end();
    return;
  }
  let urlPath;
  try {
    urlPath = new URL(req.url, 'http://localhost').pathname;
  } catch {
    urlPath = null;
  }
  // the raw path too: `..` that the URL parser already folded away must not climb out of a mount either
  const raw = (req.url || '').split('?')[0];
  const file = urlPath && !/(^|\/)(\.|%2e){2}(\/|$)/i.test(raw) ? resolve(urlPath) : null;
  if (!file) {
    res.writeHead(404, { ...headers, 'Content-Type': 'text/plain' }).end('not found\n');
    return;
  }
  const size = fs.statSync(file).size;
  res.writeHead(200, { ...headers, 'Content-Type': TYPES[path.extname(file)] || 'application/octet-stream', 'Content-Length': size });
  if (req.method === 'HEAD') {
    res.end();
    return;
  }
  fs.createReadStream(file).on('error', () => res.destroy()).pipe(res);
});

server.on('error', (e) => fail(`cannot listen on ${args.host}:${args.port} (${e.code || e.message})`));
server.listen(Number(args.port), args.host, () => {
  const { port } = server.address();
  process.stdout.write(`serving http://127.0.0.1:${port}/ (exports: ${exports.map((d, i) => `/exports/${i}/ = ${d}`).join(', ')}; ` +
    'Ctrl-C to stop)\n');
});
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => server.close(() => process.exit(0)));
