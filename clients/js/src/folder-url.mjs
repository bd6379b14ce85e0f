// An export folder served over HTTP (the browser, or anything with fetch). Confinement is lexical (no absolute
// paths, schemes or `..` that climbs out) and every segment is percent-encoded, so that `%2e%2e` cannot turn into
// `..`; the server (clients/web/serve.mjs) refuses symlinks that lead out of the folder.
import { RwkvError, utf8Text } from './errors.mjs';
import { MANIFEST, confinedSegments } from './manifest.mjs';

export class UrlFolder {
  /** `base`: the folder's URL (relative to the page or absolute); a trailing slash is added if missing. */
  constructor(base, fetchImpl = globalThis.fetch.bind(globalThis)) {
    let b = String(base);
    if (!b.endsWith('/')) b += '/';
    const origin = globalThis.location ? globalThis.location.href : undefined;
    this.base = new URL(b, origin).href;
    this.label = this.base;
    this.fetch = fetchImpl;
  }

  describe(rel) {
    return this.base + rel;
  }

  url(parts) {
    return this.base + parts.map(encodeURIComponent).join('/');
  }

  async get(url, what) {
    let r;
    try {
      r = await this.fetch(url);
    } catch (e) {
      throw new RwkvError(`cannot fetch ${what} ${url} (${e.message})`);
    }
    if (!r.ok) throw new RwkvError(`cannot fetch ${what} ${url} (HTTP ${r.status})`);
    return r;
  }

  async readManifestText() {
    let r;
    const url = this.base + MANIFEST;
    try {
      r = await this.fetch(url);
    } catch (e) {
      throw new RwkvError(`cannot fetch ${url} (${e.message})`);
    }
    if (r.status === 404) throw new RwkvError(`${this.base} has no ${MANIFEST}; it is not an rwkv-deploy export folder`);
    if (!r.ok) throw new RwkvError(`cannot fetch ${url} (HTTP ${r.status})`);
    return r.text();
  }

  async confine(key, rel) {
    const url = this.url(confinedSegments(rel, key, this.describe(MANIFEST)));
    if (!url.startsWith(this.base)) {
      throw new RwkvError(`${this.describe(MANIFEST)} ${key} = ${JSON.stringify(rel)} leads outside the export folder; refused`);
    }
    return url;
  }

  async readBytes(key, rel, what) {
    const r = await this.get(await this.confine(key, rel), what);
    return new Uint8Array(await r.arrayBuffer());
  }

  async readText(key, rel, what) {
    return utf8Text(await this.readBytes(key, rel, what), what, this.describe(rel));
  }

  async graphSource(key, rel, externalRel) {
    const model = await this.readBytes(key, rel, 'the graph');
    // ONNX Runtime Web fetches external weights itself from a URL (they are copied into the wasm heap)
    const options = externalRel
      ? { externalData: [{ path: externalRel, data: await this.confine(key.replace(/\.file$/, '.external_data'), externalRel) }] }
      : {};
    return { model, options };
  }
}
