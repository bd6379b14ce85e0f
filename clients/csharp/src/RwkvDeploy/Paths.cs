// Path confinement: every file that manifest.json names must stay inside the export folder, symlinks followed
// (the Python side's resolve_inside). An export folder is data that people download and share: a path that
// leaves it could make a reader open, or load as a library, any file on the machine.
using System;
using System.Collections.Generic;
using System.IO;
using System.Runtime.InteropServices;
using System.Text;

namespace RwkvDeploy
{
    public static class Paths
    {
        /// <summary>The absolute path `path` with every symlink in it followed and "."/".." applied, like
        /// Python's Path.resolve(strict=False): components that do not exist are kept as written.</summary>
        public static string Resolve(string path)
        {
            string full = Path.GetFullPath(path);
            char sep = Path.DirectorySeparatorChar;
            string root = Path.GetPathRoot(full);
            var pending = new List<string>(Split(full.Substring(root.Length)));
            string result = root;
            int hops = 0;
            while (pending.Count > 0)
            {
                string part = pending[0];
                pending.RemoveAt(0);
                if (part.Length == 0 || part == ".") continue;
                if (part == "..")
                {
                    string parent = Path.GetDirectoryName(result.TrimEnd(sep));
                    result = parent == null || parent.Length < root.Length ? root : parent;
                    continue;
                }
                string next = result.EndsWith(sep.ToString()) ? result + part : result + sep + part;
                string target = ReadLink(next);
                if (target == null)
                {
                    result = next;
                    continue;
                }
                if (++hops > 64) throw new RwkvError($"too many levels of symbolic links at {next}");
                if (Path.IsPathRooted(target))
                {
                    root = Path.GetPathRoot(target);
                    result = root;
                    target = target.Substring(root.Length);
                }
                pending.InsertRange(0, Split(target));
            }
            return result;
        }

        static string[] Split(string p)
        {
            return p.Split(new[] { '/', Path.DirectorySeparatorChar }, StringSplitOptions.None);
        }

        /// <summary>True when `full` (resolved) is `root` (resolved) or inside it.</summary>
        public static bool IsInside(string root, string full)
        {
            string r = root.TrimEnd(Path.DirectorySeparatorChar);
            return full == r || full.StartsWith(r + Path.DirectorySeparatorChar, StringComparison.Ordinal) ||
                   (r.Length == 0 && full.StartsWith(Path.DirectorySeparatorChar.ToString()));
        }

        /// <summary>The target of the symlink `path`, or null when it is not a symlink (or does not exist).</summary>
        public static string ReadLink(string path)
        {
#if NETCOREAPP
            try
            {
                FileSystemInfo info = new FileInfo(path);
                if (!info.Exists && Directory.Exists(path)) info = new DirectoryInfo(path);
                return info.LinkTarget;
            }
            catch (IOException) { return null; }
            catch (UnauthorizedAccessException) { return null; }
#else
            if (Environment.OSVersion.Platform != PlatformID.Unix && Environment.OSVersion.Platform != PlatformID.MacOSX)
                return null;  // .NET Framework on Windows: no symlink API here
            var buf = new byte[4096];
            long n;
            try { n = readlink(Encoding.UTF8.GetBytes(path + "\0"), buf, (IntPtr)buf.Length).ToInt64(); }
            catch (DllNotFoundException) { return null; }
            catch (EntryPointNotFoundException) { return null; }
            if (n < 0) return null;  // EINVAL (not a link), ENOENT, ...
            return Encoding.UTF8.GetString(buf, 0, (int)n);
#endif
        }

#if !NETCOREAPP
        [DllImport("libc", SetLastError = true)]
        static extern IntPtr readlink(byte[] path, byte[] buf, IntPtr size);
#endif
    }
}
