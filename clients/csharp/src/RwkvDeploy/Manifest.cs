// manifest.json: the contract of an export folder (format rwkv-deploy/2; rwkv_deploy/runtime/manifest-2.schema.json).
// Read, type-checked on every key the schema constrains, and path-checked (every file it names stays inside the
// folder) before anything else is read: the C# mirror of rwkv_deploy/runtime/manifest.py.
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;
using System.Text.RegularExpressions;

namespace RwkvDeploy
{
    public sealed class GraphInfo
    {
        public string Key;           // "step", "prefill", ...
        public string File;          // resolved path inside the folder
        public string ExternalData;  // resolved path or null
        public string Tokens;        // the int64 token input
        public string Logits;        // the float32 logits output
        public string Positions;     // prefill: "last" (logits [B, V]) or "all" ([B, T, V]); null for step
    }

    public sealed class StateEntry
    {
        public string Input, Output;
        public long[] Dims;     // the shape without the leading "batch"
        public ElemType DType;
        public double Init;
        public string InitFile; // resolved path or null
    }

    public sealed class TokenizerInfo
    {
        public string Kind;     // "rwkv-world" | "hf-tokenizers"
        public string File;     // resolved path
        public int EosTokenId;
        public int[] StopIds;
    }

    public sealed class GoldenInfo
    {
        public int[] Tokens;
        public string LogitsFile;  // resolved path
        public int Rows, Cols;
        public double Normalised, Top1;
    }

    public sealed class CustomOpsInfo
    {
        public string Domain;
        public List<string> Ops;
        public Dictionary<string, string> LibraryPath = new Dictionary<string, string>();  // provider -> resolved path
        public Dictionary<string, string> LibrarySha256 = new Dictionary<string, string>();
    }

    public sealed class Manifest
    {
        public const string Format = "rwkv-deploy/2";
        public const string FileName = "manifest.json";

        public string Folder;        // as given
        public string ManifestPath;  // Folder/manifest.json
        public Dictionary<string, object> Raw;
        public string RwkvVersion, Precision, WeightsDtype, ComputeDtype, Wkv;
        public int VocabSize, NLayer, NEmbd;
        public GraphInfo Step, Prefill;
        public List<StateEntry> State = new List<StateEntry>();
        public TokenizerInfo Tokenizer;   // null: the export has no tokenizer
        public GoldenInfo Golden;
        public CustomOpsInfo CustomOps;   // null: a portable export (standard ONNX operators only)

        /// <summary>Parse, check and path-check OUT/manifest.json; every problem is one RwkvError.</summary>
        public static Manifest Read(string folder)
        {
            if (!Directory.Exists(folder))
                throw new RwkvError(File.Exists(folder)
                    ? $"{folder} is not an export folder (not a directory); run `rwkv-deploy export` first"
                    : $"{folder} does not exist; pass an export folder (made by `rwkv-deploy export`)");
            string path = Path.Combine(folder, FileName);
            if (!File.Exists(path))
                throw new RwkvError($"{folder} has no {FileName}; it is not an rwkv-deploy export folder");
            string text;
            try
            {
                text = new UTF8Encoding(false, true).GetString(File.ReadAllBytes(path));
            }
            catch (DecoderFallbackException)
            {
                throw new RwkvError($"{path} is not valid JSON (it is not UTF-8 text)");
            }
            catch (Exception e) when (e is IOException || e is UnauthorizedAccessException)
            {
                throw new RwkvError($"cannot read {path} ({e.Message})");
            }
            object data;
            try
            {
                data = Json.Parse(text);
            }
            catch (FormatException e)
            {
                throw new RwkvError($"{path} is not valid JSON ({Trim(e.Message, 200)})");
            }
            var obj = data as Dictionary<string, object>;
            if (obj == null)
                throw new RwkvError($"{path} holds a JSON {Json.TypeName(data)}, not an object; re-export the model");
            var m = new Manifest { Folder = folder, ManifestPath = path, Raw = obj };
            object fmt;
            obj.TryGetValue("format", out fmt);
            if (!(fmt is string) || (string)fmt != Format)
            {
                if (fmt is string && (string)fmt == "rwkv-deploy/1")
                    throw new RwkvError($"{path} has format 'rwkv-deploy/1'; this client reads {Format} only: re-export the " +
                                        "model with the current rwkv-deploy (`rwkv-deploy export`)");
                throw new RwkvError($"{path} has format {(fmt == null ? "(none)" : Json.Show(fmt))}; this client reads " +
                                    $"'{Format}' (a newer format needs a newer client)");
            }
            m.Check(new Node(obj, "$", path));
            // refuse a folder that points outside itself before anything is read
            foreach (var named in m.NamedPaths()) m.Resolve(named.Value, named.Key);
            m.Bind();
            return m;
        }

        static string Trim(string s, int n) { return s.Length > n ? s.Substring(0, n) : s; }

        /// <summary>`rel` (a path that manifest.json names under `key`) resolved inside the folder, symlinks followed;
        /// an absolute path or one that leads outside is refused.</summary>
        public string Resolve(object rel, string key)
        {
            var s = rel as string;
            if (string.IsNullOrEmpty(s))
                throw new RwkvError($"{ManifestPath} {key} must be a non-empty relative path, got {Json.Show(rel)}");
            if (Path.IsPathRooted(s))
                throw new RwkvError($"{ManifestPath} {key} is the absolute path '{s}'; paths in an export folder must be " +
                                    "relative to it and stay inside it");
            string root = Paths.Resolve(Folder);
            string full = Paths.Resolve(Path.Combine(root, s));
            if (!Paths.IsInside(root, full))
                throw new RwkvError($"{ManifestPath} {key} = '{s}' leads outside the export folder (to {full}); refused");
            return full;
        }

        /// <summary>(key, relative path) of every file this manifest names.</summary>
        List<KeyValuePair<string, object>> NamedPaths()
        {
            var named = new List<KeyValuePair<string, object>>();
            foreach (var g in (Dictionary<string, object>)Raw["graphs"])
            {
                var graph = (Dictionary<string, object>)g.Value;
                foreach (var k in new[] { "file", "external_data" })
                    if (graph.ContainsKey(k) && graph[k] != null) named.Add(Pair($"graphs.{g.Key}.{k}", graph[k]));
            }
            var state = (List<object>)Raw["state"];
            for (int i = 0; i < state.Count; i++)
            {
                var s = (Dictionary<string, object>)state[i];
                if (s.ContainsKey("init_file") && s["init_file"] != null) named.Add(Pair($"state[{i}].init_file", s["init_file"]));
            }
            var tok = Raw["tokenizer"] as Dictionary<string, object>;
            if (tok != null) named.Add(Pair("tokenizer.file", tok["file"]));
            named.Add(Pair("golden.logits_file", ((Dictionary<string, object>)Raw["golden"])["logits_file"]));
            var ops = ((Dictionary<string, object>)Raw["requires"])["custom_ops"] as Dictionary<string, object>;
            if (ops != null)
                foreach (var lib in (Dictionary<string, object>)ops["libraries"])
                    named.Add(Pair($"requires.custom_ops.libraries.{lib.Key}.path", ((Dictionary<string, object>)lib.Value)["path"]));
            var engines = (List<object>)Raw["engines"];
            for (int i = 0; i < engines.Count; i++)
                named.Add(Pair($"engines[{i}].file", ((Dictionary<string, object>)engines[i])["file"]));
            return named;
        }

        static KeyValuePair<string, object> Pair(string k, object v) { return new KeyValuePair<string, object>(k, v); }

        // ---- schema checks ------------------------------------------------------------------------------------

        /// <summary>A value of the manifest with its JSON path, for checks that name where the problem is.</summary>
        sealed class Node
        {
            public readonly object Value;
            public readonly string At;
            readonly string file;

            public Node(object value, string at, string file) { Value = value; At = at; this.file = file; }

            public RwkvError Fail(string what)
            {
                return new RwkvError($"{file} does not follow the {Format} schema: at {At}, {what}; re-export the model " +
                                     "(or fix the file)");
            }

            string Shown { get { return Json.Show(Value); } }

            public Dictionary<string, object> Obj()
            {
                var d = Value as Dictionary<string, object>;
                if (d == null) throw Fail($"{Shown} is not of type 'object'");
                return d;
            }

            public Dictionary<string, object> ObjOrNull() { return Value == null ? null : Obj(); }

            public List<object> Arr(int minItems = 0)
            {
                var a = Value as List<object>;
                if (a == null) throw Fail($"{Shown} is not of type 'array'");
                if (a.Count < minItems) throw Fail(a.Count == 0 ? "[] should be non-empty" : $"{Shown} is too short");
                return a;
            }

            public string Str(int minLength = 0)
            {
                var s = Value as string;
                if (s == null) throw Fail($"{Shown} is not of type 'string'");
                if (s.Length < minLength) throw Fail($"'' should be non-empty");
                return s;
            }

            public string StrOrNull(int minLength = 0) { return Value == null ? null : Str(minLength); }

            public string Enum(params string[] allowed)
            {
                var s = Value as string;
                if (s == null || Array.IndexOf(allowed, s) < 0)
                    throw Fail($"{Shown} is not one of [{string.Join(", ", allowed.Select(a => "'" + a + "'"))}]");
                return s;
            }

            public double Num()
            {
                var n = Value as JsonNumber;
                if (n == null) throw Fail($"{Shown} is not of type 'number'");
                return n.Value;
            }

            public long Int(long minimum)
            {
                var n = Value as JsonNumber;
                long v;
                if (n == null || !n.IsInteger) throw Fail($"{Shown} is not of type 'integer'");
                if (!long.TryParse(n.Text, out v) || v > int.MaxValue) throw Fail($"{Shown} is too large");
                if (v < minimum) throw Fail($"{Shown} is less than the minimum of {minimum}");
                return v;
            }

            public int Dim() { return (int)Int(1); }
            public int TokenId() { return (int)Int(0); }

            public Node this[string key]
            {
                get
                {
                    var d = Obj();
                    object v;
                    if (!d.TryGetValue(key, out v)) throw Fail($"'{key}' is a required property");
                    return new Node(v, At + "." + key, file);
                }
            }

            public bool Has(string key) { return Obj().ContainsKey(key); }

            public Node Elem(int i) { return new Node(((List<object>)Value)[i], At + "[" + i + "]", file); }

            public IEnumerable<Node> Items(int minItems = 0)
            {
                var a = Arr(minItems);
                for (int i = 0; i < a.Count; i++) yield return Elem(i);
            }
        }

        static readonly string[] Required = { "format", "rwkv_version", "n_layer", "n_embd", "vocab_size", "precision",
            "weights_dtype", "compute_dtype", "quantization", "wkv", "graphs", "state", "tokenizer", "requires", "golden",
            "engines", "source" };

        static readonly Regex Sha256 = new Regex("^[0-9a-f]{64}$");

        void Check(Node root)
        {
            foreach (var k in Required)
                if (!root.Has(k)) throw root.Fail($"'{k}' is a required property");
            RwkvVersion = root["rwkv_version"].Str(1);
            NLayer = root["n_layer"].Dim();
            NEmbd = root["n_embd"].Dim();
            foreach (var k in new[] { "dim_att", "dim_ffn", "n_head", "head_size" })
                if (root.Has(k)) root[k].Dim();
            VocabSize = root["vocab_size"].Dim();
            Precision = root["precision"].Str(1);
            WeightsDtype = root["weights_dtype"].Enum("float32", "float16", "int8", "int4");
            ComputeDtype = root["compute_dtype"].Enum("float32", "float16");
            var q = root["quantization"].ObjOrNull();
            if (q != null)
            {
                root["quantization"]["method"].Str(1);
                if (q.ContainsKey("block_size")) root["quantization"]["block_size"].Int(1);
                if (q.ContainsKey("tensors")) foreach (var t in root["quantization"]["tensors"].Items()) t.Str();
            }
            Wkv = root["wkv"].Enum("portable", "fused");
            if (root.Has("opset")) root["opset"].Int(1);
            if (root.Has("rescale_every")) root["rescale_every"].Int(0);

            var graphs = root["graphs"];
            graphs.Obj();
            graphs["step"].Obj();
            foreach (var g in graphs.Obj().Keys.ToList()) CheckGraph(graphs[g], g == "prefill");

            foreach (var s in root["state"].Items(1))
            {
                s["input"].Str(1);
                s["output"].Str(1);
                var shape = s["shape"].Arr(2);
                if (!(shape[0] is string) || (string)shape[0] != "batch")
                    throw s["shape"].Elem(0).Fail($"'batch' was expected");
                for (int i = 1; i < shape.Count; i++) s["shape"].Elem(i).Dim();
                s["dtype"].Enum("float32", "float16");
                s["init"].Num();
                if (s.Has("init_file")) s["init_file"].StrOrNull(1);
                if (s.Has("layer")) s["layer"].Int(0);
                if (s.Has("kind")) s["kind"].Str();
            }

            var tok = root["tokenizer"];
            if (tok.ObjOrNull() != null)
            {
                tok["kind"].Enum("rwkv-world", "hf-tokenizers");
                tok["file"].Str(1);
                tok["eos_token_id"].TokenId();
                tok["stop"].Obj();
                foreach (var t in tok["stop"]["token_ids"].Items(1)) t.TokenId();
            }

            var ops = root["requires"]["custom_ops"];
            if (ops.ObjOrNull() != null)
            {
                ops["domain"].Str(1);
                foreach (var o in ops["ops"].Items(1)) o.Str(1);
                var libs = ops["libraries"].Obj();
                if (libs.Count == 0) throw ops["libraries"].Fail("{} should be non-empty");
                foreach (var ep in libs.Keys.ToList())
                {
                    if (!ep.EndsWith("ExecutionProvider"))
                        throw ops["libraries"].Fail($"'{ep}' does not match 'ExecutionProvider$'");
                    ops["libraries"][ep]["path"].Str(1);
                    var sha = ops["libraries"][ep]["sha256"];
                    if (!Sha256.IsMatch(sha.Str())) throw sha.Fail($"{Json.Show(sha.Value)} does not match '^[0-9a-f]{{64}}$'");
                }
            }

            var golden = root["golden"];
            foreach (var t in golden["tokens"].Items(1)) t.TokenId();
            golden["logits_file"].Str(1);
            var gshape = golden["shape"].Arr(2);
            if (gshape.Count != 2) throw golden["shape"].Fail($"{Json.Show(gshape)} is too long");
            golden["shape"].Elem(0).Dim();
            golden["shape"].Elem(1).Dim();
            golden["dtype"].Enum("float32");
            var tol = golden["tolerance"];
            if (!(tol["normalised"].Num() > 0)) throw tol["normalised"].Fail("it must be greater than 0");
            double top1 = tol["top1"].Num();
            if (!(top1 >= 0 && top1 <= 1)) throw tol["top1"].Fail("it must be within [0, 1]");

            foreach (var e in root["engines"].Items())
            {
                e["file"].Str(1);
                e["graph"].Str(1);
                if (e.Has("sha256") && !Sha256.IsMatch(e["sha256"].Str())) throw e["sha256"].Fail("it is not a sha256");
            }
            var source = root["source"];
            source["path"].Str();
            if (!Sha256.IsMatch(source["sha256"].Str()))
                throw source["sha256"].Fail($"{Json.Show(source["sha256"].Value)} does not match '^[0-9a-f]{{64}}$'");
        }

        static void CheckGraph(Node g, bool prefill)
        {
            g.Obj();
            g["file"].Str(1);
            if (g.Has("external_data")) g["external_data"].StrOrNull(1);
            g["tokens"].Str(1);
            g["logits"].Str(1);
            foreach (var k in new[] { "tokens_dtype", "logits_dtype" }) if (g.Has(k)) g[k].Str();
            foreach (var k in new[] { "tokens_shape", "logits_shape" })
                if (g.Has(k))
                    foreach (var d in g[k].Items(1))
                        if (!(d.Value is string)) d.Int(long.MinValue);
            if (prefill && g.Has("positions")) g["positions"].Enum("last", "all");
        }

        // ---- typed view ---------------------------------------------------------------------------------------

        void Bind()
        {
            var graphs = (Dictionary<string, object>)Raw["graphs"];
            Step = BindGraph("step", (Dictionary<string, object>)graphs["step"]);
            if (graphs.ContainsKey("prefill")) Prefill = BindGraph("prefill", (Dictionary<string, object>)graphs["prefill"]);
            var state = (List<object>)Raw["state"];
            for (int i = 0; i < state.Count; i++)
            {
                var s = (Dictionary<string, object>)state[i];
                var shape = (List<object>)s["shape"];
                var e = new StateEntry
                {
                    Input = (string)s["input"],
                    Output = (string)s["output"],
                    Dims = shape.Skip(1).Select(d => (long)((JsonNumber)d).Value).ToArray(),
                    DType = ElemTypes.FromName((string)s["dtype"]).Value,
                    Init = ((JsonNumber)s["init"]).Value,
                };
                object f;
                if (s.TryGetValue("init_file", out f) && f != null) e.InitFile = Resolve(f, $"init_file of state '{e.Input}'");
                State.Add(e);
            }
            var tok = Raw["tokenizer"] as Dictionary<string, object>;
            if (tok != null)
                Tokenizer = new TokenizerInfo
                {
                    Kind = (string)tok["kind"],
                    File = Resolve(tok["file"], "tokenizer.file"),
                    EosTokenId = (int)((JsonNumber)tok["eos_token_id"]).Value,
                    StopIds = ((List<object>)((Dictionary<string, object>)tok["stop"])["token_ids"])
                        .Select(t => (int)((JsonNumber)t).Value).ToArray(),
                };
            var golden = (Dictionary<string, object>)Raw["golden"];
            var gshape = (List<object>)golden["shape"];
            var tol = (Dictionary<string, object>)golden["tolerance"];
            Golden = new GoldenInfo
            {
                Tokens = ((List<object>)golden["tokens"]).Select(t => (int)((JsonNumber)t).Value).ToArray(),
                LogitsFile = Resolve(golden["logits_file"], "golden.logits_file"),
                Rows = (int)((JsonNumber)gshape[0]).Value,
                Cols = (int)((JsonNumber)gshape[1]).Value,
                Normalised = ((JsonNumber)tol["normalised"]).Value,
                Top1 = ((JsonNumber)tol["top1"]).Value,
            };
            var ops = ((Dictionary<string, object>)Raw["requires"])["custom_ops"] as Dictionary<string, object>;
            if (ops != null)
            {
                CustomOps = new CustomOpsInfo
                {
                    Domain = (string)ops["domain"],
                    Ops = ((List<object>)ops["ops"]).Cast<string>().ToList(),
                };
                foreach (var lib in (Dictionary<string, object>)ops["libraries"])
                {
                    var l = (Dictionary<string, object>)lib.Value;
                    CustomOps.LibraryPath[lib.Key] = Resolve(l["path"], $"requires.custom_ops.libraries.{lib.Key}.path");
                    CustomOps.LibrarySha256[lib.Key] = (string)l["sha256"];
                }
            }
        }

        GraphInfo BindGraph(string key, Dictionary<string, object> g)
        {
            object ext, pos;
            g.TryGetValue("external_data", out ext);
            g.TryGetValue("positions", out pos);
            return new GraphInfo
            {
                Key = key,
                File = Resolve(g["file"], $"graphs.{key}.file"),
                ExternalData = ext == null ? null : Resolve(ext, $"graphs.{key}.external_data"),
                Tokens = (string)g["tokens"],
                Logits = (string)g["logits"],
                Positions = key == "prefill" ? (pos as string ?? "last") : null,
            };
        }
    }
}
