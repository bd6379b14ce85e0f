// The generation page: the same library as the Node CLI (clients/js/src), on ONNX Runtime Web's wasm backend.
// ?export=URL picks the export folder (default: /export/, what serve.mjs serves). For tests and tools the page
// exposes window.rwkvReady (a Promise of the session), window.rwkvScore(tokens) (a Promise of the logits after
// each token, from the initial state at batch 1: what `cli.mjs score` prints) and window.rwkvLast (the last
// generation: {text, pieces, stats}).
import * as ort from 'onnxruntime-web';
import { openExportUrl, generate, GenerationStats, score, RwkvError } from '/lib/browser.mjs';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const exportUrl = params.get('export') || '/export/';

ort.env.wasm.wasmPaths = new URL('/node_modules/onnxruntime-web/dist/', location.href).href;
ort.env.logLevel = 'error';
if (params.has('threads')) ort.env.wasm.numThreads = Number(params.get('threads'));

function showError(e) {
  const status = $('status');
  status.textContent = `error: ${e instanceof RwkvError ? e.message : (e && e.stack) || e}`;
  status.className = 'error';
}

const ready = openExportUrl(ort, exportUrl);
window.rwkvReady = ready;
window.rwkvScore = async (tokens) => (await score(await ready, tokens)).map((row) => Array.from(row));

let stopRequested = false;

async function onGenerate() {
  const session = await ready;
  const output = $('output');
  output.textContent = '';
  $('stats').textContent = '';
  $('generate').disabled = true;
  $('stop').disabled = false;
  stopRequested = false;
  const stats = new GenerationStats();
  const pieces = [];
  const seedText = $('seed').value.trim();
  const show = () => {
    $('stats').textContent = `${stats.tokens} tokens, ${stats.seconds > 0 ? stats.tokensPerSecond.toFixed(1) : '-'} tokens/s ` +
      `(prompt ${stats.promptTokens} tokens in ${stats.promptSeconds.toFixed(2)} s)`;
  };
  try {
    $('status').textContent = 'generating…';
    $('status').className = 'muted';
    const options = {
      maxTokens: Number($('max-tokens').value), temperature: Number($('temperature').value),
      topP: Number($('top-p').value), seed: seedText === '' ? null : seedText, stats,
    };
    for await (const piece of generate(session, $('prompt').value, options)) {
      pieces.push(piece);
      output.textContent += piece;
      show();
      if (stopRequested) break;
    }
    show();
    $('status').textContent = 'done';
  } catch (e) {
    showError(e);
  } finally {
    window.rwkvLast = { text: pieces.join(''), pieces, stats: { ...stats, tokensPerSecond: stats.tokensPerSecond } };
    $('generate').disabled = false;
    $('stop').disabled = true;
  }
}

ready.then((session) => {
  const m = session.manifest;
  $('model').textContent = `RWKV-${m.rwkv_version}, ${m.n_layer} layers × ${m.n_embd}, vocabulary ${m.vocab_size}, ${m.precision}` +
    `${session.hasPrefill ? ', prefill graph' : ''} — ${session.folder.label}`;
  const threads = ort.env.wasm.numThreads;
  $('runtime').textContent = `ONNX Runtime Web ${ort.env.versions?.web ?? ''} (wasm, ${threads} thread${threads === 1 ? '' : 's'}` +
    `${crossOriginIsolated ? '' : '; not cross-origin isolated: no wasm threads'})`;
  $('status').textContent = m.tokenizer ? 'ready' : 'ready; this export has no tokenizer: scoring only';
  $('generate').disabled = !m.tokenizer;
}, showError);

$('generate').addEventListener('click', onGenerate);
$('stop').addEventListener('click', () => { stopRequested = true; });
