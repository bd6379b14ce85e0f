// An export folder on the local file system (Node). Confinement follows symlinks, as the Python runtime's
// resolve_inside does: a named file that is (or passes through) a symlink leading out of the folder is refused.
import fs from 'node:fs';
import path from 'node:path';
import { RwkvError, utf8Text } from './errors.mjs';
import { MANIFEST, confinedSegments } from './manifest.mjs';

/** The real path of `p`, following symlinks as far as the path exists (like Python's resolve(strict=False)). */
function realpathLoose(p) {
  const rest = [];
  let cur = p;
  for (;;) {
    try {
      return path.join(fs.realpathSync(cur), ...rest.reverse());
    } catch (e) {
      if (e.code !== 'ENOENT' && e.code !== 'ENOTDIR') throw e;
      const parent = path.dirname(cur);
      if (parent === cur) return p;
      rest.push(path.basename(cur));
      cur = parent;
    }
  }
}

const errno = (e) => e.code || e.message;

/** The whole file, read in chunks: fs.readFileSync stops at 2 GiB, external weights can be larger. */
function readWhole(p) {
  const fd = fs.openSync(p, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const out = new Uint8Array(size);
    for (let at = 0; at < size;) {
      const n = fs.readSync(fd, out, at, Math.min(size - at, 1 << 30), at);
      if (n === 0) throw Object.assign(new Error('the file shrank while being read'), { code: 'EIO' });
      at += n;
    }
    return out;
  } finally {
    fs.closeSync(fd);
  }
}

export class NodeFolder {
  constructor(dir) {
    this.dir = String(dir);
    this.label = this.dir;
  }

  describe(rel) {
    return path.join(this.dir, rel);
  }

  async readManifestText() {
    let st;
    try {
      st = fs.statSync(this.dir);
    } catch {
      st = null;
    }
    if (!st || !st.isDirectory()) {
      throw new RwkvError(`${this.dir} is not an export folder (not a directory); run \`rwkv-deploy export\` first`);
    }
    const p = path.join(this.dir, MANIFEST);
    if (!fs.existsSync(p)) throw new RwkvError(`${this.dir} has no ${MANIFEST}; it is not an rwkv-deploy export folder`);
    try {
      return fs.readFileSync(p, 'utf8');
    } catch (e) {
      throw new RwkvError(`cannot read ${p} (${errno(e)})`);
    }
  }

  /** The absolute path of `rel` once it is known to stay inside the folder, symlinks followed. */
  async confine(key, rel) {
    const where = this.describe(MANIFEST);
    const parts = confinedSegments(rel, key, where);
    const root = fs.realpathSync(this.dir);
    const full = realpathLoose(path.join(root, ...parts));
    const back = path.relative(root, full);
    if (back === '' || back.startsWith('..') || path.isAbsolute(back)) {
      throw new RwkvError(`${where} ${key} = ${JSON.stringify(rel)} leads outside the export folder (to ${full}); refused`);
    }
    return full;
  }

  async readBytes(key, rel, what) {
    const p = await this.confine(key, rel);
    try {
      return readWhole(p);
    } catch (e) {
      throw new RwkvError(`cannot read ${what} ${p} (${errno(e)}); re-export the model`);
    }
  }

  async readText(key, rel, what) {
    return utf8Text(await this.readBytes(key, rel, what), what, this.describe(rel));
  }

  /** What InferenceSession.create takes for a graph: its path for onnxruntime-node (which finds external data
   * beside it), its bytes for onnxruntime-web; and the externalData option for the web. */
  async graphSource(key, rel, externalRel, runtime) {
    const p = await this.confine(key, rel);
    if (!fs.existsSync(p)) throw new RwkvError(`${p} is missing; the export folder is incomplete, re-export it`);
    let data = null;
    if (externalRel) {
      data = await this.confine(key.replace(/\.file$/, '.external_data'), externalRel);
      if (!fs.existsSync(data)) {
        throw new RwkvError(`${data} (the weights of ${path.basename(p)}) is missing; the export folder is incomplete, re-export it`);
      }
    }
    if (runtime === 'node') return { model: p, options: {} };
    const bytes = await this.readBytes(key, rel, 'the graph');
    const options = data ? { externalData: [{ path: externalRel, data: await this.readBytes('external_data', externalRel, 'the weights') }] } : {};
    return { model: bytes, options };
  }
}
