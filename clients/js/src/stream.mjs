// Byte-exact streaming (rwkv_deploy.runtime.tokenizer.TextStream): token ids in, text out, one token at a time;
// the pieces join to tokenizer.decode(all ids). A character whose UTF-8 bytes are split across tokens is held
// back until its last byte arrives; U+FFFD only stands for bytes that can never become valid.

export class TextStream {
  constructor(tokenizer) {
    this.tok = tokenizer;
    this.utf8 = new TextDecoder('utf-8'); // fatal: false -> U+FFFD, like Python's errors="replace"
    this.ids = []; // only kept for tokenizers whose text depends on the neighbouring tokens
    this.sent = '';
  }

  /** The text that `id` completes ('' while a character is unfinished). */
  push(id) {
    if (this.tok.bytesPerToken !== false) return this.utf8.decode(this.tok.decodeBytes([id]), { stream: true });
    // Context-dependent decoders: decode everything and send what is new. A decoder with byte fallback shows an
    // unfinished character as a trailing U+FFFD, so that one is held back until the next token.
    this.ids.push(id);
    const text = this.tok.decode(this.ids);
    const stable = text.endsWith('\ufffd') ? text.slice(0, -1) : text;
    if (stable.length <= this.sent.length) return '';
    const piece = stable.slice(this.sent.length);
    this.sent = stable;
    return piece;
  }

  /** What is still held back, with U+FFFD for a character that never got finished. */
  finish() {
    if (this.tok.bytesPerToken !== false) return this.utf8.decode();
    const text = this.tok.decode(this.ids);
    const piece = text.slice(this.sent.length);
    this.sent = text;
    return piece;
  }
}
