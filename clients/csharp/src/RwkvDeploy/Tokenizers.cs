// Tokenizers (the C# mirror of rwkv_deploy/runtime/tokenizer.py):
//   WorldTokenizer - the RWKV World vocabulary (rwkv_vocab_v20230424.txt): greedy longest byte match over a trie
//   HfTokenizer    - a Hugging Face tokenizers JSON file with a byte-level BPE (GPT-NeoX-20B's, used by RWKV-4 Pile
//                    models): added/special tokens, NFC-style normalizers, the GPT-2 pre-tokenizer, BPE merges
//   TextStream     - ids in, text out one token at a time; a character split across tokens is held back until
//                    its last byte arrives (byte-exact, with Python's U+FFFD rules for bytes that never decode)
using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Text;

namespace RwkvDeploy
{
    public interface ITokenizer
    {
        string Kind { get; }

        /// <summary>Ids 0 .. VocabSize-1 (some may be unused); generation samples only among these.</summary>
        int VocabSize { get; }

        int[] Encode(string text);

        /// <summary>The bytes of one token (id 0 of the World vocabulary, end of text, has none); an id the
        /// tokenizer lacks is an RwkvError, never silently dropped text.</summary>
        byte[] TokenBytes(int id);
    }

    public static class Tokenizers
    {
        public const string World = "rwkv-world", HuggingFace = "hf-tokenizers";

        /// <summary>By file name: *.json is a tokenizers file, *.txt an RWKV World vocabulary.</summary>
        public static string KindOf(string path)
        {
            string ext = Path.GetExtension(path);
            if (ext == ".json") return HuggingFace;
            if (ext == ".txt") return World;
            throw new RwkvError($"{path}: unknown tokenizer file type; expected a tokenizers .json or an RWKV World .txt");
        }

        public static ITokenizer Load(string path, string kind = null)
        {
            if (!File.Exists(path)) throw new RwkvError($"tokenizer file not found: {path}");
            kind = kind ?? KindOf(path);
            if (kind == World) return new WorldTokenizer(path);
            if (kind == HuggingFace) return new HfTokenizer(path);
            throw new RwkvError($"unknown tokenizer kind '{kind}' for {path}; known kinds: {World}, {HuggingFace}");
        }

        /// <summary>The file as strict UTF-8 text, or an RwkvError naming it.</summary>
        internal static string ReadText(string path, string what)
        {
            byte[] data;
            try
            {
                data = File.ReadAllBytes(path);
            }
            catch (Exception e) when (e is IOException || e is UnauthorizedAccessException)
            {
                throw new RwkvError($"cannot read {what} {path}: {e.Message}");
            }
            try
            {
                return new UTF8Encoding(false, true).GetString(data);
            }
            catch (DecoderFallbackException e)
            {
                int at = Math.Max(0, e.Index);
                string b = e.BytesUnknown != null && e.BytesUnknown.Length > 0 ? $"byte 0x{e.BytesUnknown[0]:x2} " : "";
                throw new RwkvError($"{what} {path} is not UTF-8 text ({b}near offset {at}); is it the right file?");
            }
        }

        /// <summary>Text as UTF-8; text with a lone surrogate (which no tokenizer can encode) is an RwkvError.</summary>
        public static byte[] Utf8(string text, string what = "the text")
        {
            for (int i = 0; i < text.Length; i++)
            {
                char c = text[i];
                if (char.IsHighSurrogate(c) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1])) i++;
                else if (char.IsSurrogate(c))
                    throw new RwkvError($"{what} is not valid UTF-8 (character U+{(int)c:X4} at position {i}); pass UTF-8 text");
            }
            return Encoding.UTF8.GetBytes(text);
        }
    }

    // ---- the RWKV World vocabulary --------------------------------------------------------------------------

    /// <summary>Ids 1..65529 from `&lt;id&gt; &lt;python literal&gt; &lt;byte length&gt;` lines; id 0 is end-of-text and has no bytes.</summary>
    public sealed class WorldTokenizer : ITokenizer
    {
        readonly Dictionary<int, byte[]> idToBytes = new Dictionary<int, byte[]>();
        // the trie over bytes: node * 256 + byte -> child node; token id ending at each node (-1: none)
        readonly Dictionary<long, int> children = new Dictionary<long, int>();
        readonly List<int> nodeToken = new List<int> { -1 };
        readonly int vocabSize;

        public string Kind { get { return Tokenizers.World; } }
        public int VocabSize { get { return vocabSize; } }

        // what Python's str.splitlines() splits on: a raw one inside a literal would break the line there too
        static readonly char[] LineBreaks = { '\n', '\r', '\v', '\f', '\x1c', '\x1d', '\x1e', '\x85', '\u2028', '\u2029' };

        public WorldTokenizer(string path)
        {
            string text = Tokenizers.ReadText(path, "RWKV World vocabulary");
            int n = 0, pos = 0;
            while (pos < text.Length)
            {
                int end = text.IndexOfAny(LineBreaks, pos);
                int next = end < 0 ? text.Length : end + 1;
                if (end >= 0 && text[end] == '\r' && next < text.Length && text[next] == '\n') next++;
                string line = text.Substring(pos, (end < 0 ? text.Length : end) - pos);
                pos = next;
                n++;
                if (line.Trim().Length == 0) continue;
                int idx, length;
                byte[] tok;
                try
                {
                    int first = line.IndexOf(' '), last = line.LastIndexOf(' ');
                    if (first < 0 || last <= first) throw new FormatException("expected '<id> <literal> <length>'");
                    idx = ParseInt(line.Substring(0, first));
                    length = ParseInt(line.Substring(last + 1));
                    tok = PyLiteral.Parse(line.Substring(first + 1, last - first - 1));
                }
                catch (FormatException e)
                {
                    throw new RwkvError($"{path}:{n}: not an RWKV World vocabulary line ({e.Message})");
                }
                if (tok.Length != length)
                    throw new RwkvError($"{path}:{n}: token {idx} has {tok.Length} bytes, the file says {length}");
                idToBytes[idx] = tok;
                int node = 0;
                foreach (byte b in tok)
                {
                    int child;
                    long key = (long)node * 256 + b;
                    if (!children.TryGetValue(key, out child))
                    {
                        child = nodeToken.Count;
                        nodeToken.Add(-1);
                        children[key] = child;
                    }
                    node = child;
                }
                if (tok.Length > 0) nodeToken[node] = idx;
            }
            if (idToBytes.Count == 0) throw new RwkvError($"{path} has no tokens; expected an RWKV World vocabulary");
            vocabSize = idToBytes.Keys.Max() + 1;
        }

        static int ParseInt(string s)
        {
            int v;
            if (!int.TryParse(s.Trim(), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out v))
                throw new FormatException($"invalid integer '{s}'");
            return v;
        }

        public int[] Encode(string text)
        {
            byte[] src = Tokenizers.Utf8(text);
            var ids = new List<int>();
            int i = 0;
            while (i < src.Length)
            {
                int node = 0, j = i, best = -1, bestEnd = i;
                while (j < src.Length)  // walk as deep as the bytes allow, remember the last token
                {
                    int child;
                    if (!children.TryGetValue((long)node * 256 + src[j], out child)) break;
                    node = child;
                    j++;
                    if (nodeToken[node] >= 0)
                    {
                        best = nodeToken[node];
                        bestEnd = j;
                    }
                }
                if (best < 0) throw new RwkvError($"byte 0x{src[i]:x} has no token in this vocabulary");
                ids.Add(best);
                i = bestEnd;
            }
            return ids.ToArray();
        }

        public byte[] TokenBytes(int id)
        {
            if (id == 0) return new byte[0];
            byte[] b;
            if (!idToBytes.TryGetValue(id, out b))
                throw new RwkvError($"token id {id} is not in the RWKV World vocabulary (ids 1..{vocabSize - 1}, 0 = end of text)");
            return b;
        }
    }

    /// <summary>Python string and bytes literals, as the World vocabulary writes its tokens ('…', "…", b'…', with
    /// Python's escapes), as bytes: a str literal's characters in UTF-8, a bytes literal's bytes.</summary>
    public static class PyLiteral
    {
        public static byte[] Parse(string lit)
        {
            int i = 0;
            bool isBytes = false, raw = false;
            while (i < lit.Length && "bBrRuU".IndexOf(lit[i]) >= 0)
            {
                char p = char.ToLowerInvariant(lit[i]);
                if (p == 'b') isBytes = true;
                else if (p == 'r') raw = true;
                i++;
            }
            string prefix = lit.Substring(0, i).ToLowerInvariant();
            if (prefix.Length > 2 || (prefix.Contains("u") && prefix.Length > 1) ||
                prefix.Count(c => c == 'b') > 1 || prefix.Count(c => c == 'r') > 1)
                throw new FormatException($"{lit} is neither a str nor a bytes literal");
            if (i >= lit.Length || (lit[i] != '\'' && lit[i] != '"'))
                throw new FormatException($"{lit} is neither a str nor a bytes literal");
            char q = lit[i];
            int qlen = lit.Length - i >= 6 && lit[i + 1] == q && lit[i + 2] == q ? 3 : 1;
            string quote = new string(q, qlen);
            if (lit.Length - i < 2 * qlen || !lit.EndsWith(quote))
                throw new FormatException($"unterminated literal {lit}");
            int start = i + qlen, end = lit.Length - qlen;
            var cps = new List<int>();  // code points (str) or byte values (bytes)
            for (int k = start; k < end; k++)
            {
                char c = lit[k];
                if (c == q && qlen == 1) throw new FormatException($"unexpected quote in {lit}");
                if (c == '\\' && !raw)
                {
                    if (k + 1 >= end) throw new FormatException($"unterminated escape in {lit}");
                    char e = lit[++k];
                    switch (e)
                    {
                        case '\n': continue;  // line continuation
                        case '\\': cps.Add('\\'); continue;
                        case '\'': cps.Add('\''); continue;
                        case '"': cps.Add('"'); continue;
                        case 'a': cps.Add(7); continue;
                        case 'b': cps.Add(8); continue;
                        case 'f': cps.Add(12); continue;
                        case 'n': cps.Add(10); continue;
                        case 'r': cps.Add(13); continue;
                        case 't': cps.Add(9); continue;
                        case 'v': cps.Add(11); continue;
                        case 'x': cps.Add(Hex(lit, ref k, 2, end)); continue;
                    }
                    if (e >= '0' && e <= '7')
                    {
                        int v = e - '0', digits = 1;
                        while (digits < 3 && k + 1 < end && lit[k + 1] >= '0' && lit[k + 1] <= '7')
                        {
                            v = v * 8 + (lit[++k] - '0');
                            digits++;
                        }
                        if (isBytes && v > 255) throw new FormatException($"octal escape out of range in {lit}");
                        cps.Add(v);
                        continue;
                    }
                    if (!isBytes && e == 'u') { cps.Add(Hex(lit, ref k, 4, end)); continue; }
                    if (!isBytes && e == 'U')
                    {
                        int v = Hex(lit, ref k, 8, end);
                        if (v > 0x10FFFF) throw new FormatException($"illegal Unicode character in {lit}");
                        cps.Add(v);
                        continue;
                    }
                    if (!isBytes && e == 'N') throw new FormatException($"\\N{{...}} escapes are not supported ({lit})");
                    cps.Add('\\');  // an unknown escape keeps its backslash, as Python does
                    k--;
                    continue;
                }
                if (char.IsHighSurrogate(c) && k + 1 < end && char.IsLowSurrogate(lit[k + 1]))
                {
                    if (isBytes) throw new FormatException("bytes can only contain ASCII literal characters");
                    cps.Add(char.ConvertToUtf32(c, lit[++k]));
                    continue;
                }
                if (isBytes && c > 127) throw new FormatException("bytes can only contain ASCII literal characters");
                cps.Add(c);
            }
            if (isBytes) return cps.Select(v => (byte)v).ToArray();
            var sb = new StringBuilder();
            foreach (int cp in cps)
            {
                if (cp >= 0xD800 && cp <= 0xDFFF)
                    throw new FormatException($"'utf-8' codec can't encode character U+{cp:X4}: surrogates not allowed");
                sb.Append(char.ConvertFromUtf32(cp));
            }
            return Encoding.UTF8.GetBytes(sb.ToString());
        }

        static int Hex(string s, ref int k, int digits, int end)
        {
            // k is at the escape letter; its digits are s[k+1 .. k+digits], all before `end`
            if (k + digits >= end) throw new FormatException($"truncated \\x/\\u escape in {s}");
            int v = 0;
            for (int d = 0; d < digits; d++)
            {
                int h = HexDigit(s[k + 1 + d]);
                if (h < 0) throw new FormatException($"truncated \\x/\\u escape in {s}");
                v = v * 16 + h;
            }
            k += digits;
            return v;
        }

        static int HexDigit(char c)
        {
            if (c >= '0' && c <= '9') return c - '0';
            if (c >= 'a' && c <= 'f') return c - 'a' + 10;
            if (c >= 'A' && c <= 'F') return c - 'A' + 10;
            return -1;
        }
    }

    // ---- Hugging Face tokenizers: byte-level BPE ------------------------------------------------------------

    /// <summary>A tokenizers JSON file with a BPE model, a ByteLevel pre-tokenizer (the GPT-2 split) and a ByteLevel
    /// decoder, plus added/special tokens and Unicode normalizers: what RWKV-4 Pile models ship (GPT-NeoX-20B's
    /// tokenizer). Any other kind of tokenizers file is refused with an error that says what is unsupported.</summary>
    public sealed class HfTokenizer : ITokenizer
    {
        sealed class Added
        {
            public int Id;
            public string Content;
            public bool SingleWord, LStrip, RStrip, Normalized, Special;
        }

        struct Merge
        {
            public int Rank, NewId;
        }

        sealed class CharTrie
        {
            public readonly Dictionary<char, CharTrie> Next = new Dictionary<char, CharTrie>();
            public Added Token;  // a pattern ends here
        }

        readonly string path;
        readonly Dictionary<string, int> vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        readonly Dictionary<int, string> vocabR = new Dictionary<int, string>();
        readonly Dictionary<long, Merge> merges = new Dictionary<long, Merge>();
        readonly Dictionary<int, Added> addedById = new Dictionary<int, Added>();
        readonly CharTrie rawTrie = new CharTrie(), normalizedTrie = new CharTrie();
        readonly List<NormalizationForm> normalizers = new List<NormalizationForm>();
        readonly bool addPrefixSpace, useRegex = true, ignoreMerges;
        readonly int unkId = -1;
        readonly int vocabSize;
        readonly Dictionary<string, int[]> cache = new Dictionary<string, int[]>(StringComparer.Ordinal);
        readonly Dictionary<int, byte[]> bytesCache = new Dictionary<int, byte[]>();

        public string Kind { get { return Tokenizers.HuggingFace; } }
        public int VocabSize { get { return vocabSize; } }

        public HfTokenizer(string path)
        {
            this.path = path;
            object parsed;
            try
            {
                parsed = Json.Parse(Tokenizers.ReadText(path, "tokenizer file"));
            }
            catch (FormatException e)
            {
                throw new RwkvError($"{path} is not a tokenizers JSON file ({e.Message})");
            }
            var root = parsed as Dictionary<string, object>;
            if (root == null || !root.ContainsKey("model"))
                throw new RwkvError($"{path} is not a tokenizers JSON file (no \"model\")");

            var model = Obj(root["model"], "model");
            string type = Str(Get(model, "type")) ?? (model.ContainsKey("merges") ? "BPE" : null);
            if (type != "BPE") Unsupported($"a {type ?? "untyped"} model (only BPE models are supported)");
            if (Get(model, "dropout") != null) Unsupported("BPE dropout");
            if (!string.IsNullOrEmpty(Str(Get(model, "continuing_subword_prefix"))) ||
                !string.IsNullOrEmpty(Str(Get(model, "end_of_word_suffix"))))
                Unsupported("continuing_subword_prefix / end_of_word_suffix (not a byte-level BPE)");
            if (Get(model, "byte_fallback") is bool && (bool)Get(model, "byte_fallback")) Unsupported("byte_fallback");
            ignoreMerges = Get(model, "ignore_merges") is bool && (bool)Get(model, "ignore_merges");

            foreach (var p in Obj(Get(model, "vocab"), "model.vocab"))
            {
                int id = Id(p.Value, "model.vocab");
                vocab[p.Key] = id;
                vocabR[id] = p.Key;
            }
            var mergeList = Get(model, "merges") as List<object>;
            if (mergeList == null) throw new RwkvError($"{path}: model.merges is not a list");
            for (int rank = 0; rank < mergeList.Count; rank++)
            {
                string a, b;
                var m = mergeList[rank];
                if (m is string)
                {
                    var parts = ((string)m).Split(' ');
                    if (parts.Length != 2) throw new RwkvError($"{path}: merge {rank} '{m}' is not two tokens");
                    a = parts[0];
                    b = parts[1];
                }
                else if (m is List<object> && ((List<object>)m).Count == 2 && ((List<object>)m).All(x => x is string))
                {
                    a = (string)((List<object>)m)[0];
                    b = (string)((List<object>)m)[1];
                }
                else throw new RwkvError($"{path}: merge {rank} is neither \"a b\" nor [a, b]");
                int ia, ib, inew;
                if (!vocab.TryGetValue(a, out ia) || !vocab.TryGetValue(b, out ib) || !vocab.TryGetValue(a + b, out inew))
                    throw new RwkvError($"{path}: merge {rank} ({a} {b}) uses a token that is not in the vocabulary");
                merges[Key(ia, ib)] = new Merge { Rank = rank, NewId = inew };
            }
            string unk = Str(Get(model, "unk_token"));
            if (unk != null && vocab.ContainsKey(unk)) unkId = vocab[unk];

            ReadNormalizer(Get(root, "normalizer"));
            ReadPreTokenizer(Get(root, "pre_tokenizer"), ref addPrefixSpace, ref useRegex);
            if (!IsByteLevel(Get(root, "decoder")))
                Unsupported("a decoder other than ByteLevel (its text depends on neighbouring tokens)");
            var post = Get(root, "post_processor") as Dictionary<string, object>;
            if (post != null && Str(Get(post, "type")) != "ByteLevel")
                Unsupported($"the post-processor {Str(Get(post, "type"))} (it adds special tokens to every encoding)");

            var added = Get(root, "added_tokens") as List<object> ?? new List<object>();
            var merged = new Dictionary<string, int>(vocab, StringComparer.Ordinal);
            foreach (var item in added)
            {
                var t = Obj(item, "added_tokens[]");
                var a = new Added
                {
                    Id = Id(Get(t, "id"), "added_tokens[].id"),
                    Content = Str(Get(t, "content")) ?? "",
                    SingleWord = Flag(t, "single_word", false),
                    LStrip = Flag(t, "lstrip", false),
                    RStrip = Flag(t, "rstrip", false),
                    Special = Flag(t, "special", false),
                };
                a.Normalized = Flag(t, "normalized", !a.Special);
                addedById[a.Id] = a;
                merged[a.Content] = a.Id;
                if (a.Content.Length == 0) continue;
                Insert(a.Normalized ? normalizedTrie : rawTrie, a.Normalized ? Normalize(a.Content) : a.Content, a);
            }
            vocabSize = merged.Count;  // tokenizers' get_vocab_size(with_added_tokens=True)
        }

        void Unsupported(string what)
        {
            throw new RwkvError($"{path}: this client supports byte-level BPE tokenizers (GPT-NeoX-20B's, as RWKV-4 Pile " +
                                $"models use), not {what}");
        }

        static object Get(Dictionary<string, object> d, string k)
        {
            object v;
            return d != null && d.TryGetValue(k, out v) ? v : null;
        }

        Dictionary<string, object> Obj(object v, string what)
        {
            var d = v as Dictionary<string, object>;
            if (d == null) throw new RwkvError($"{path}: {what} is not an object");
            return d;
        }

        static string Str(object v) { return v as string; }

        static bool Flag(Dictionary<string, object> d, string k, bool dflt)
        {
            var v = Get(d, k);
            return v is bool ? (bool)v : dflt;
        }

        int Id(object v, string what)
        {
            var n = v as JsonNumber;
            if (n == null || !n.IsInteger || n.Value < 0 || n.Value > int.MaxValue)
                throw new RwkvError($"{path}: {what} has an id that is not a non-negative integer ({Json.Show(v)})");
            return (int)n.Value;
        }

        static long Key(int a, int b) { return ((long)a << 32) | (uint)b; }

        static void Insert(CharTrie trie, string s, Added token)
        {
            foreach (char c in s)
            {
                CharTrie next;
                if (!trie.Next.TryGetValue(c, out next)) trie.Next[c] = next = new CharTrie();
                trie = next;
            }
            trie.Token = token;
        }

        void ReadNormalizer(object n)
        {
            if (n == null) return;
            var d = Obj(n, "normalizer");
            string type = Str(Get(d, "type"));
            switch (type)
            {
                case "NFC": normalizers.Add(NormalizationForm.FormC); return;
                case "NFD": normalizers.Add(NormalizationForm.FormD); return;
                case "NFKC": normalizers.Add(NormalizationForm.FormKC); return;
                case "NFKD": normalizers.Add(NormalizationForm.FormKD); return;
                case "Sequence":
                    foreach (var item in Get(d, "normalizers") as List<object> ?? new List<object>()) ReadNormalizer(item);
                    return;
            }
            Unsupported($"the normalizer {type} (NFC, NFD, NFKC and NFKD are supported)");
        }

        void ReadPreTokenizer(object p, ref bool prefixSpace, ref bool regex)
        {
            var d = p as Dictionary<string, object>;
            string type = d == null ? null : Str(Get(d, "type"));
            if (type == "Sequence")
            {
                var items = Get(d, "pretokenizers") as List<object>;
                if (items != null && items.Count == 1)
                {
                    ReadPreTokenizer(items[0], ref prefixSpace, ref regex);
                    return;
                }
            }
            if (type != "ByteLevel") Unsupported($"the pre-tokenizer {type ?? "null"} (only ByteLevel is supported)");
            prefixSpace = Flag(d, "add_prefix_space", true);
            regex = Flag(d, "use_regex", true);
        }

        static bool IsByteLevel(object decoder)
        {
            var d = decoder as Dictionary<string, object>;
            if (d == null) return false;
            string type = Str(Get(d, "type"));
            if (type == "Sequence")
            {
                var parts = Get(d, "decoders") as List<object>;
                return parts != null && parts.Count > 0 && parts.All(IsByteLevel);
            }
            return type == "ByteLevel";
        }

        string Normalize(string s)
        {
            foreach (var form in normalizers) s = s.Normalize(form);
            return s;
        }

        // -- encode --

        public int[] Encode(string text)
        {
            Tokenizers.Utf8(text);  // rejects lone surrogates
            var ids = new List<int>();
            // 1. added tokens that match the raw text, 2. normalize the rest, 3. added tokens that match normalized text
            foreach (var piece in SplitAdded(text, rawTrie))
            {
                if (piece.Token != null) { ids.Add(piece.Token.Id); continue; }
                foreach (var inner in SplitAdded(Normalize(piece.Text), normalizedTrie))
                {
                    if (inner.Token != null) ids.Add(inner.Token.Id);
                    else if (inner.Text.Length > 0) EncodePiece(inner.Text, ids);
                }
            }
            return ids.ToArray();
        }

        struct Piece
        {
            public string Text;
            public Added Token;
        }

        /// <summary>Split on the added tokens of `trie`: leftmost-longest matches, with single_word, lstrip and rstrip
        /// applied as tokenizers applies them.</summary>
        static List<Piece> SplitAdded(string s, CharTrie trie)
        {
            var pieces = new List<Piece>();
            int offset = 0, i = 0;
            while (i < s.Length)
            {
                CharTrie node = trie;
                Added best = null;
                int bestEnd = -1;
                for (int j = i; j < s.Length; j++)
                {
                    if (!node.Next.TryGetValue(s[j], out node)) break;
                    if (node.Token != null) { best = node.Token; bestEnd = j + 1; }
                }
                if (best == null) { i++; continue; }
                int start = i, stop = bestEnd;
                i = bestEnd;
                if (best.SingleWord && ((start > 0 && IsWordChar(s, start - 1, true)) || (stop < s.Length && IsWordChar(s, stop, false))))
                    continue;
                if (best.LStrip)
                {
                    int k = start;
                    while (k > 0 && char.IsWhiteSpace(s[k - 1])) k--;
                    start = Math.Max(k, offset);
                }
                if (best.RStrip)
                    while (stop < s.Length && char.IsWhiteSpace(s[stop])) stop++;
                if (offset < start) pieces.Add(new Piece { Text = s.Substring(offset, start - offset) });
                pieces.Add(new Piece { Text = s.Substring(start, stop - start), Token = best });
                offset = stop;
                i = Math.Max(i, stop);
            }
            if (offset < s.Length || pieces.Count == 0) pieces.Add(new Piece { Text = s.Substring(offset) });
            return pieces;
        }

        /// <summary>Is the code point ending at (before) / starting at index a regex \w character?</summary>
        static bool IsWordChar(string s, int index, bool before)
        {
            int at = index;
            if (before && char.IsLowSurrogate(s[at]) && at > 0 && char.IsHighSurrogate(s[at - 1])) at--;
            var cat = CharUnicodeInfo.GetUnicodeCategory(s, at);
            switch (cat)
            {
                case UnicodeCategory.UppercaseLetter: case UnicodeCategory.LowercaseLetter: case UnicodeCategory.TitlecaseLetter:
                case UnicodeCategory.ModifierLetter: case UnicodeCategory.OtherLetter: case UnicodeCategory.DecimalDigitNumber:
                case UnicodeCategory.LetterNumber: case UnicodeCategory.NonSpacingMark: case UnicodeCategory.SpacingCombiningMark:
                case UnicodeCategory.EnclosingMark: case UnicodeCategory.ConnectorPunctuation:
                    return true;
            }
            return s[at] == '\u200c' || s[at] == '\u200d';
        }

        void EncodePiece(string text, List<int> ids)
        {
            if (addPrefixSpace && !text.StartsWith(" ")) text = " " + text;
            foreach (var word in useRegex ? PreTokenize(text) : new List<string> { text })
            {
                var sb = new StringBuilder();
                foreach (byte b in Encoding.UTF8.GetBytes(word)) sb.Append(ByteLevel.CharOf[b]);
                ids.AddRange(Bpe(sb.ToString()));
            }
        }

        enum Cls { Letter, Number, Space, Other }

        static Cls Classify(int cp, string s, int at)
        {
            if (char.IsWhiteSpace(s, at)) return Cls.Space;
            switch (CharUnicodeInfo.GetUnicodeCategory(s, at))
            {
                case UnicodeCategory.UppercaseLetter: case UnicodeCategory.LowercaseLetter: case UnicodeCategory.TitlecaseLetter:
                case UnicodeCategory.ModifierLetter: case UnicodeCategory.OtherLetter:
                    return Cls.Letter;
                case UnicodeCategory.DecimalDigitNumber: case UnicodeCategory.LetterNumber: case UnicodeCategory.OtherNumber:
                    return Cls.Number;
            }
            return Cls.Other;
        }

        /// <summary>The GPT-2 split, by code point:
        /// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+</summary>
        static List<string> PreTokenize(string s)
        {
            var starts = new List<int>();  // UTF-16 index of each code point
            var cps = new List<int>();
            for (int k = 0; k < s.Length; k++)
            {
                starts.Add(k);
                if (char.IsHighSurrogate(s[k]) && k + 1 < s.Length && char.IsLowSurrogate(s[k + 1]))
                {
                    cps.Add(char.ConvertToUtf32(s[k], s[k + 1]));
                    k++;
                }
                else cps.Add(s[k]);
            }
            int n = cps.Count;
            var cls = new Cls[n];
            for (int k = 0; k < n; k++) cls[k] = Classify(cps[k], s, starts[k]);
            var words = new List<string>();
            int i = 0;
            while (i < n)
            {
                int end = -1;
                if (cps[i] == '\'' && i + 1 < n)
                {
                    int c1 = cps[i + 1], c2 = i + 2 < n ? cps[i + 2] : -1;
                    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') end = i + 2;
                    else if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) end = i + 3;
                }
                if (end < 0)
                {
                    int j = cps[i] == ' ' ? i + 1 : i;
                    if (j < n && cls[j] != Cls.Space)
                    {
                        Cls c = cls[j];  // ` ?\p{L}+`, ` ?\p{N}+` or ` ?[^\s\p{L}\p{N}]+`
                        end = j;
                        while (end < n && cls[end] == c) end++;
                    }
                    else
                    {
                        int k = i;
                        while (k < n && cls[k] == Cls.Space) k++;
                        // \s+(?!\S): all of it at the end, else all but the last (which joins the next word);
                        // \s+: a single whitespace before a non-space
                        end = k == n || k - i < 2 ? k : k - 1;
                    }
                }
                int from = starts[i], to = end < n ? starts[end] : s.Length;
                words.Add(s.Substring(from, to - from));
                i = end;
            }
            return words;
        }

        /// <summary>BPE on one byte-level word: repeatedly merge the adjacent pair of lowest rank (leftmost first).</summary>
        int[] Bpe(string word)
        {
            int[] cached;
            if (cache.TryGetValue(word, out cached)) return cached;
            int whole;
            if (ignoreMerges && vocab.TryGetValue(word, out whole)) return cache[word] = new[] { whole };
            var symbols = new List<int>();
            foreach (char c in word)
            {
                int id;
                if (vocab.TryGetValue(c.ToString(), out id)) symbols.Add(id);
                else if (unkId >= 0) symbols.Add(unkId);
            }
            while (symbols.Count > 1)
            {
                int bestAt = -1;
                Merge best = new Merge { Rank = int.MaxValue };
                for (int k = 0; k + 1 < symbols.Count; k++)
                {
                    Merge m;
                    if (merges.TryGetValue(Key(symbols[k], symbols[k + 1]), out m) && m.Rank < best.Rank)
                    {
                        best = m;
                        bestAt = k;
                    }
                }
                if (bestAt < 0) break;
                symbols[bestAt] = best.NewId;
                symbols.RemoveAt(bestAt + 1);
            }
            var result = symbols.ToArray();
            if (cache.Count < 100000) cache[word] = result;
            return result;
        }

        // -- decode --

        public byte[] TokenBytes(int id)
        {
            byte[] b;
            if (bytesCache.TryGetValue(id, out b)) return b;
            Added a;
            string s;
            if (addedById.TryGetValue(id, out a)) b = Encoding.UTF8.GetBytes(a.Content);  // added tokens are plain text
            else if (vocabR.TryGetValue(id, out s))
            {
                var bytes = new List<byte>();
                foreach (char c in s)
                {
                    int v;
                    if (ByteLevel.ByteOf.TryGetValue(c, out v)) bytes.Add((byte)v);
                    else bytes.AddRange(Encoding.UTF8.GetBytes(c.ToString()));  // outside the alphabet: its own UTF-8
                }
                b = bytes.ToArray();
            }
            else throw new RwkvError($"token id {id} is not in this tokenizer's vocabulary ({vocabSize} tokens)");
            bytesCache[id] = b;
            return b;
        }
    }

    /// <summary>GPT-2's bytes_to_unicode: printable bytes stand for themselves, byte number n of the others (in
    /// byte order) for U+0100 + n. Byte-level BPE vocabularies spell their tokens in this alphabet.</summary>
    static class ByteLevel
    {
        public static readonly char[] CharOf = new char[256];
        public static readonly Dictionary<char, int> ByteOf = new Dictionary<char, int>();

        static ByteLevel()
        {
            int n = 0;
            for (int b = 0; b < 256; b++)
            {
                bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
                CharOf[b] = printable ? (char)b : (char)(256 + n++);
                ByteOf[CharOf[b]] = b;
            }
        }
    }

    // ---- streaming ------------------------------------------------------------------------------------------

    /// <summary>An incremental UTF-8 decoder with Python's rules: a character split across calls is held back
    /// until complete, and each maximal invalid subpart becomes one U+FFFD (as codecs' "replace" does).</summary>
    public sealed class Utf8Stream
    {
        readonly List<byte> held = new List<byte>(4);

        public string Decode(byte[] data, bool final = false)
        {
            var buf = new List<byte>(held);
            buf.AddRange(data);
            held.Clear();
            var sb = new StringBuilder();
            int i = 0, n = buf.Count;
            while (i < n)
            {
                int c = buf[i];
                if (c < 0x80) { sb.Append((char)c); i++; continue; }
                int need, lo = 0x80, hi = 0xBF, cp;
                if (c >= 0xC2 && c <= 0xDF) { need = 1; cp = c & 0x1F; }
                else if (c >= 0xE0 && c <= 0xEF)
                {
                    need = 2;
                    cp = c & 0x0F;
                    if (c == 0xE0) lo = 0xA0;
                    else if (c == 0xED) hi = 0x9F;
                }
                else if (c >= 0xF0 && c <= 0xF4)
                {
                    need = 3;
                    cp = c & 0x07;
                    if (c == 0xF0) lo = 0x90;
                    else if (c == 0xF4) hi = 0x8F;
                }
                else { sb.Append('\uFFFD'); i++; continue; }
                int j = i + 1, k = 0;
                bool bad = false, incomplete = false;
                while (k < need)
                {
                    if (j >= n) { incomplete = true; break; }
                    int x = buf[j];
                    if (x < (k == 0 ? lo : 0x80) || x > (k == 0 ? hi : 0xBF)) { bad = true; break; }
                    cp = (cp << 6) | (x & 0x3F);
                    j++;
                    k++;
                }
                if (incomplete)
                {
                    if (final) sb.Append('\uFFFD');
                    else held.AddRange(buf.GetRange(i, n - i));
                    break;
                }
                if (bad) { sb.Append('\uFFFD'); i = j; continue; }
                sb.Append(char.ConvertFromUtf32(cp));
                i = j;
            }
            return sb.ToString();
        }
    }

    /// <summary>Token ids in, text out, one token at a time; the pieces join to the decoded text of all ids.</summary>
    public sealed class TextStream
    {
        readonly ITokenizer tok;
        readonly Utf8Stream utf8 = new Utf8Stream();

        public TextStream(ITokenizer tok) { this.tok = tok; }

        /// <summary>The text that `id` completes ("" while a character is unfinished).</summary>
        public string Push(int id) { return utf8.Decode(tok.TokenBytes(id)); }

        /// <summary>What is still held back, with U+FFFD for a character that never got finished.</summary>
        public string Finish() { return utf8.Decode(new byte[0], true); }
    }
}
