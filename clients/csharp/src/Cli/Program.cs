// rwkv-deploy-cs: the command-line client. Commands (the same interface as the JavaScript client):
//   run OUT --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P] [--seed S]
//   score OUT --tokens 1,2,3
//   check OUT
//   tokenize (OUT | --tokenizer FILE [--kind KIND])
//   batch
// Bad input: one `error: ...` line on stderr and exit code 2. A check that ran and failed: exit code 1.
// An exception that is not bad input (a bug): one `error: internal error ...` line and exit code 70.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Text;
using RwkvDeploy;

static class Program
{
    const string Prog = "rwkv-deploy-cs";

    const string Usage = @"usage: rwkv-deploy-cs COMMAND ...

  run OUT --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P] [--seed S]
        generate text after TEXT (streamed to stdout; a tokens/s line on stderr)
        defaults: --max-tokens 100 --temperature 1.0 --top-p 0.85; --temperature 0 is greedy
  score OUT --tokens 1,2,3
        one JSON array: per token, the logits after it (initial state, batch 1, one token per step)
  check OUT
        replay the folder's golden logits: a table, then PASS (exit 0) or FAIL (exit 1)
  tokenize (OUT | --tokenizer FILE [--kind rwkv-world|hf-tokenizers])
        stdin: JSON lines, each a string (encode it) or {""ids"": [...]} (decode those ids); stdout: one JSON
        object per line: {""ids"", ""pieces"" (what a stream returned for each id, then what finish()
        returned), ""text"" (the pieces joined), ""decoded"" (all ids decoded at once), ""bytes"" (hex)}, or
        {""error"": ""...""} for a line that fails; stderr: the tokenizer's kind and number of ids
  batch
        stdin: JSON lines, each the argv of one command above (not tokenize); stdout: one JSON object per
        line, {""rc"", ""stdout"", ""stderr""}: many commands in one process, as if each ran alone

options for run, score and check:
  --ort-lib PATH        the ONNX Runtime shared library (default: $RWKV_ORT_LIB, else libonnxruntime.so on
                        the loader's search path)
  --threads N           ONNX Runtime intra-op threads (default: its own choice)
  --trust-custom-ops    load a fused export's custom-op library (runs its native code; its sha256 must match
                        manifest.json)
  --debug               show stack traces";

    static int Main(string[] args)
    {
        var utf8 = new UTF8Encoding(false);
        var stdout = new StreamWriter(Console.OpenStandardOutput(), utf8) { AutoFlush = false };
        var stderr = new StreamWriter(Console.OpenStandardError(), utf8) { AutoFlush = true };
        Console.SetOut(stdout);
        Console.SetError(stderr);
        try
        {
            if (args.Length == 1 && args[0] == "batch") return Batch(stdout);
            return Execute(args);
        }
        finally
        {
            try { stdout.Flush(); } catch (IOException) { }
        }
    }

    /// <summary>One command line, with the exit-code contract: 0 done, 1 a check that failed, 2 bad input (one
    /// `error:` line), 70 a bug (one `error: internal error` line; --debug shows the stack trace).</summary>
    static int Execute(string[] args)
    {
        bool debug = args.Contains("--debug");
        try
        {
            return Run(args.Where(a => a != "--debug").ToArray());
        }
        catch (UsageError e)
        {
            Console.Error.WriteLine($"error: {e.Message} (see `{Prog} --help`)");
            return 2;
        }
        catch (Exception e)
        {
            if (debug) Console.Error.WriteLine(e);
            bool bug;
            Console.Error.WriteLine("error: " + Describe(e, out bug));
            return bug ? 70 : 2;
        }
    }

    /// <summary>`batch`: each stdin line is the argv of one command; each result is one JSON line.</summary>
    static int Batch(TextWriter stdout)
    {
        var stderr = Console.Error;
        var stdin = new StreamReader(Console.OpenStandardInput(), new UTF8Encoding(false, true));
        string line;
        int n = 0;
        while ((line = stdin.ReadLine()) != null)
        {
            n++;
            if (line.Trim().Length == 0) continue;
            string[] argv;
            try
            {
                var parsed = Json.Parse(line) as List<object>;
                if (parsed == null || !parsed.All(x => x is string)) throw new FormatException("not an array of strings");
                argv = parsed.Cast<string>().ToArray();
            }
            catch (FormatException e)
            {
                stderr.WriteLine($"error: batch line {n} is not a JSON array of strings ({e.Message})");
                return 2;
            }
            if (argv.Length > 0 && (argv[0] == "batch" || argv[0] == "tokenize"))
            {
                stderr.WriteLine($"error: batch line {n}: {argv[0]} cannot run inside batch (it reads stdin)");
                return 2;
            }
            var o = new StringWriter();
            var err = new StringWriter();
            Console.SetOut(o);
            Console.SetError(err);
            int rc;
            try
            {
                rc = Execute(argv);
            }
            finally
            {
                Console.SetOut(stdout);
                Console.SetError(stderr);
            }
            var sb = new StringBuilder("{\"rc\": ").Append(rc).Append(", \"stdout\": ");
            Json.Quote(sb, o.ToString()).Append(", \"stderr\": ");
            Json.Quote(sb, err.ToString()).Append("}\n");
            stdout.Write(sb.ToString());
            stdout.Flush();
        }
        return 0;
    }

    /// <summary>One line for an exception that reached the CLI boundary.</summary>
    static string Describe(Exception e, out bool bug)
    {
        bug = false;
        if (e is RwkvError) return e.Message;
        if (e is OutOfMemoryException) return "out of memory; free memory or use a smaller model or token count";
        if (e is IOException || e is UnauthorizedAccessException) return e.Message;
        if (e is OrtException) return "ONNX Runtime: " + RwkvSession.FirstLine(e.Message);
        if (e is DllNotFoundException || e is EntryPointNotFoundException || e is BadImageFormatException)
            return "cannot load a native library: " + RwkvSession.FirstLine(e.Message);
        bug = true;
        return $"internal error ({e.GetType().Name}: {RwkvSession.FirstLine(e.Message)}); rerun with --debug and report it";
    }

    sealed class UsageError : Exception
    {
        public UsageError(string m) : base(m) { }
    }

    /// <summary>Parsed arguments: positionals, and options as name -> value ("" for flags).</summary>
    sealed class Args
    {
        public readonly List<string> Positional = new List<string>();
        public readonly Dictionary<string, string> Options = new Dictionary<string, string>();

        public string Get(string name) { string v; return Options.TryGetValue(name, out v) ? v : null; }
        public bool Flag(string name) { return Options.ContainsKey(name); }
    }

    static Args Parse(string[] argv, string command, string[] valued, string[] flags)
    {
        var a = new Args();
        for (int i = 0; i < argv.Length; i++)
        {
            string s = argv[i];
            if (s.StartsWith("--") && s.Length > 2)
            {
                string name = s, value = null;
                int eq = s.IndexOf('=');
                if (eq > 0) { name = s.Substring(0, eq); value = s.Substring(eq + 1); }
                if (valued.Contains(name))
                {
                    if (value == null)
                    {
                        if (i + 1 >= argv.Length) throw new UsageError($"argument {name}: expected one argument");
                        value = argv[++i];
                    }
                    a.Options[name] = value;
                }
                else if (flags.Contains(name) && value == null) a.Options[name] = "";
                else throw new UsageError($"{command}: unrecognized argument {s}");
            }
            else a.Positional.Add(s);
        }
        return a;
    }

    static readonly string[] SessionOptions = { "--ort-lib", "--threads" };

    static int Run(string[] argv)
    {
        if (argv.Length == 0) throw new UsageError("the following arguments are required: COMMAND");
        string command = argv[0];
        var rest = argv.Skip(1).ToArray();
        switch (command)
        {
            case "-h": case "--help": case "help":
                Console.Out.WriteLine(Usage);
                return 0;
            case "--version":
                Console.Out.WriteLine(Prog + " " + typeof(RwkvSession).Assembly.GetName().Version);
                return 0;
            case "run":
                return CmdRun(Parse(rest, command, SessionOptions.Concat(new[] { "--prompt", "--max-tokens", "--temperature", "--top-p", "--seed" }).ToArray(),
                                    new[] { "--trust-custom-ops" }));
            case "score":
                return CmdScore(Parse(rest, command, SessionOptions.Concat(new[] { "--tokens" }).ToArray(), new[] { "--trust-custom-ops" }));
            case "check":
                return CmdCheck(Parse(rest, command, SessionOptions, new[] { "--trust-custom-ops" }));
            case "tokenize":
                return CmdTokenize(Parse(rest, command, new[] { "--tokenizer", "--kind" }, new[] { "--vocab" }));
            default:
                throw new UsageError($"unknown command '{command}'; expected run, score, check or tokenize");
        }
    }

    static string Folder(Args a, string command)
    {
        if (a.Positional.Count == 0) throw new UsageError($"{command}: the following arguments are required: OUT");
        if (a.Positional.Count > 1) throw new UsageError($"{command}: unrecognized arguments: {string.Join(" ", a.Positional.Skip(1))}");
        return a.Positional[0];
    }

    static long Integer(Args a, string name, long dflt, long min, long max)
    {
        string s = a.Get(name);
        if (s == null) return dflt;
        long v;
        if (!long.TryParse(s, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out v))
            throw new UsageError($"argument {name}: expected an integer, got '{s}'");
        if (v < min || v > max) throw new UsageError($"argument {name}: must be in [{min}, {max}], got '{s}'");
        return v;
    }

    static double Number(Args a, string name, double dflt)
    {
        string s = a.Get(name);
        if (s == null) return dflt;
        double v;
        if (!double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out v))
            throw new UsageError($"argument {name}: expected a number, got '{s}'");
        return v;
    }

    /// <summary>The backend and an open session on folder OUT. The manifest is read (and path-checked) first, so a
    /// bad folder is reported before ONNX Runtime is even loaded.</summary>
    static RwkvSession Open(Args a, string folder, out IOrtBackend backend)
    {
        var manifest = Manifest.Read(folder);
        int threads = (int)Integer(a, "--threads", 0, 1, 1024);
        string lib = a.Get("--ort-lib") ?? Environment.GetEnvironmentVariable("RWKV_ORT_LIB");
#if RWKV_MSORT
        // built by dotnet with the Microsoft.ML.OnnxRuntime package: that binding, unless a library is named
        backend = string.IsNullOrEmpty(lib) ? (IOrtBackend)new MsOrtBackend() : new OrtCApiBackend(lib);
#else
        backend = new OrtCApiBackend(lib);
#endif
        try
        {
            return new RwkvSession(manifest, backend, new RwkvDeploy.SessionOptions
            {
                Threads = threads,
                TrustCustomOps = a.Flag("--trust-custom-ops"),
            });
        }
        catch
        {
            backend.Dispose();
            throw;
        }
    }

    static int CmdRun(Args a)
    {
        string folder = Folder(a, "run");
        string prompt = a.Get("--prompt");
        if (prompt == null) throw new UsageError("run: the following arguments are required: --prompt");
        double temperature = Number(a, "--temperature", 1.0);
        if (!(temperature >= 0 && !double.IsInfinity(temperature)))
            throw new UsageError($"argument --temperature: must be a finite number >= 0 (0 = greedy), got '{a.Get("--temperature")}'");
        double topP = Number(a, "--top-p", 0.85);
        if (!(topP > 0 && topP <= 1)) throw new UsageError($"argument --top-p: must be in (0, 1], got '{a.Get("--top-p")}'");
        var options = new GenerateOptions
        {
            MaxTokens = (int)Integer(a, "--max-tokens", 100, 0, int.MaxValue),
            Temperature = temperature,
            TopP = topP,
        };
        if (a.Get("--seed") != null) options.Seed = (ulong)Integer(a, "--seed", 0, 0, long.MaxValue);
        Tokenizers.Utf8(prompt, "the prompt");
        IOrtBackend backend;
        using (var session = Open(a, folder, out backend))
        using (backend)
        {
            var info = session.Manifest.Tokenizer;
            if (info == null)
                throw new RwkvError($"{folder} has no tokenizer; re-export with --tokenizer FILE (or attach one: " +
                                    "`rwkv-deploy tokenizer OUT FILE`)");
            var tok = Tokenizers.Load(info.File, info.Kind);  // a bad tokenizer is an error before anything is printed
            var stop = new HashSet<int>(info.StopIds);
            var stats = new GenerationStats();
            bool started = false;
            Action<string> write = piece =>
            {
                if (!started) { Console.Out.Write(prompt); started = true; }
                Console.Out.Write(piece);
                Console.Out.Flush();
            };
            if (tok.Encode(prompt).Length == 0) throw new RwkvError("the prompt is empty; pass some text with --prompt");
            write("");
            Generator.Generate(session, tok, stop, prompt, options, write, stats);
            Console.Out.Write("\n");
            Console.Out.Flush();
            Console.Error.WriteLine(stats.Line());
        }
        return 0;
    }

    static int CmdScore(Args a)
    {
        string folder = Folder(a, "score");
        string text = a.Get("--tokens");
        if (text == null) throw new UsageError("score: the following arguments are required: --tokens");
        var tokens = new List<int>();
        foreach (var part in text.Split(','))
        {
            int t;
            if (!int.TryParse(part.Trim(), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out t))
                throw new UsageError($"argument --tokens: expected comma-separated token ids, got '{text}'");
            tokens.Add(t);
        }
        IOrtBackend backend;
        using (var session = Open(a, folder, out backend))
        using (backend)
        {
            foreach (var t in tokens)
                if (t < 0 || t >= session.VocabSize) throw new RwkvError($"token id {t} is out of range [0, {session.VocabSize})");
            var rows = GoldenCheck.Score(session, tokens);
            var sb = new StringBuilder("[");
            for (int r = 0; r < rows.Length; r++)
            {
                if (r > 0) sb.Append(",\n");
                sb.Append('[');
                for (int v = 0; v < rows[r].Length; v++)
                {
                    if (v > 0) sb.Append(',');
                    sb.Append(Json.Float(rows[r][v]));
                }
                sb.Append(']');
            }
            sb.Append("]\n");
            Console.Out.Write(sb.ToString());
        }
        return 0;
    }

    static int CmdCheck(Args a)
    {
        string folder = Folder(a, "check");
        IOrtBackend backend;
        var manifest = Manifest.Read(folder);
        GoldenCheck.ReadGolden(manifest);  // a folder whose golden file is broken fails before ONNX Runtime loads
        using (var session = Open(a, folder, out backend))
        using (backend)
        {
            var result = GoldenCheck.Run(session);
            Console.Out.WriteLine(result.Table());
            Console.Out.Flush();
            if (!result.Passed)
            {
                Console.Error.WriteLine("verification failed: " + result.Reason());
                return 1;
            }
        }
        return 0;
    }

    static int CmdTokenize(Args a)
    {
        ITokenizer tok;
        string file = a.Get("--tokenizer");
        if (file != null)
        {
            if (a.Positional.Count > 0) throw new UsageError("tokenize: pass OUT or --tokenizer FILE, not both");
            tok = Tokenizers.Load(file, a.Get("--kind"));
        }
        else
        {
            var manifest = Manifest.Read(Folder(a, "tokenize"));
            if (manifest.Tokenizer == null) throw new RwkvError($"{manifest.Folder} has no tokenizer; re-export with --tokenizer FILE");
            file = manifest.Tokenizer.File;
            tok = Tokenizers.Load(file, manifest.Tokenizer.Kind);
        }
        Console.Error.WriteLine($"tokenizer {file}: {tok.Kind}, {tok.VocabSize} ids");
        var stdin = new StreamReader(Console.OpenStandardInput(), new UTF8Encoding(false, true));
        string line;
        int n = 0;
        while ((line = stdin.ReadLine()) != null)
        {
            n++;
            if (line.Trim().Length == 0) continue;
            var sb = new StringBuilder("{");
            try
            {
                object item;
                try { item = Json.Parse(line); }
                catch (FormatException e) { throw new RwkvError($"stdin line {n} is not valid JSON ({e.Message})"); }
                int[] ids = Ids(item, n, tok);
                var stream = new TextStream(tok);
                var pieces = ids.Select(i => stream.Push(i)).ToList();
                pieces.Add(stream.Finish());
                var bytes = new List<byte>();
                foreach (var i in ids) bytes.AddRange(tok.TokenBytes(i));
                sb.Append("\"ids\": [").Append(string.Join(", ", ids)).Append("], \"pieces\": [");
                for (int k = 0; k < pieces.Count; k++)
                {
                    if (k > 0) sb.Append(", ");
                    Json.Quote(sb, pieces[k]);
                }
                sb.Append("], \"text\": ");
                Json.Quote(sb, string.Concat(pieces)).Append(", \"decoded\": ");
                Json.Quote(sb, new Utf8Stream().Decode(bytes.ToArray(), true));
                sb.Append(", \"bytes\": \"").Append(string.Concat(bytes.Select(b => b.ToString("x2")))).Append('"');
            }
            catch (RwkvError e)
            {
                sb.Length = 1;
                sb.Append("\"error\": ");
                Json.Quote(sb, e.Message);
            }
            sb.Append("}\n");
            Console.Out.Write(sb.ToString());
        }
        return 0;
    }

    /// <summary>A tokenize input line: a string (encoded) or {"ids": [...]} (decoded as given).</summary>
    static int[] Ids(object item, int line, ITokenizer tok)
    {
        var s = item as string;
        if (s != null) return tok.Encode(s);
        var d = item as Dictionary<string, object>;
        object ids;
        if (d != null && d.TryGetValue("ids", out ids) && ids is List<object> &&
            ((List<object>)ids).All(x => x is JsonNumber && ((JsonNumber)x).IsInteger))
            return ((List<object>)ids).Select(x =>
            {
                double v = ((JsonNumber)x).Value;
                if (v < 0 || v > int.MaxValue) throw new RwkvError($"token id {((JsonNumber)x).Text} is not in this tokenizer's vocabulary");
                return (int)v;
            }).ToArray();
        throw new RwkvError($"stdin line {line} is {Json.Show(item)}; expected a string or {{\"ids\": [...]}}");
    }
}
