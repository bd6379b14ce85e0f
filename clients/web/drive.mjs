#!/usr/bin/env node
// Drives the page in headless Chromium with playwright-core (the tests' browser, and a quick manual check):
//
//   node clients/web/drive.mjs --url http://127.0.0.1:8080/ [--generate] [--prompt TEXT] [--max-tokens N]
//       [--temperature T] [--top-p P] [--seed S] [--screenshot FILE] [--score JOBS.json]
//       [--chromium /usr/bin/chromium]
//
// --generate fills the form, clicks Generate and waits until it is done; --screenshot saves the page after that;
// --score reads [{"export": "/exports/0/", "tokens": [..]}, ...] and calls window.rwkvScore(tokens) on the page
// loaded with ?export=... for each. Prints one JSON object: {generation: {output, last, stats, status}, scores,
// console}. Playwright's own browser download is not used: it launches the system Chromium.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(HERE, '..', 'js', 'package.json'));
const { chromium } = require('playwright-core'); // resolved from clients/js/node_modules

const { values: a } = parseArgs({
  options: {
    url: { type: 'string' }, generate: { type: 'boolean', default: false }, prompt: { type: 'string' },
    'max-tokens': { type: 'string' }, temperature: { type: 'string' }, 'top-p': { type: 'string' }, seed: { type: 'string' },
    screenshot: { type: 'string' }, score: { type: 'string' }, chromium: { type: 'string', default: '/usr/bin/chromium' },
    timeout: { type: 'string', default: '120000' },
  },
  strict: true,
});
if (!a.url) {
  process.stderr.write('error: drive.mjs needs --url\n');
  process.exit(2);
}
const timeout = Number(a.timeout);

const browser = await chromium.launch({
  executablePath: a.chromium,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
    '--no-first-run', '--disable-dev-shm-usage'],
});
const result = { generation: null, scores: [], console: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 720 }, deviceScaleFactor: 1 });
  page.setDefaultTimeout(timeout);
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') result.console.push(`${m.type()}: ${m.text()}`); });
  page.on('pageerror', (e) => result.console.push(`pageerror: ${e.message}`));
  page.on('response', (r) => { if (r.status() >= 400) result.console.push(`http ${r.status()}: ${r.url()}`); });
  const load = async (url) => {
    await page.goto(url);
    await page.waitForFunction(() => window.rwkvReady !== undefined);
    const err = await page.evaluate(() => window.rwkvReady.then(() => null, (e) => String(e && e.message || e)));
    if (err) throw new Error(`the page could not open the export: ${err}`);
  };
  if (a.generate || a.screenshot) {
    await load(a.url);
    if (a.generate) {
      for (const [flag, id] of [['prompt', 'prompt'], ['max-tokens', 'max-tokens'], ['temperature', 'temperature'], ['top-p', 'top-p'], ['seed', 'seed']]) {
        if (a[flag] !== undefined) await page.fill(`#${id}`, a[flag]);
      }
      await page.click('#generate');
      await page.waitForFunction(() => window.rwkvLast !== undefined && !document.getElementById('generate').disabled);
      result.generation = await page.evaluate(() => ({
        output: document.getElementById('output').textContent,
        stats: document.getElementById('stats').textContent,
        status: document.getElementById('status').textContent,
        last: window.rwkvLast,
      }));
    }
    if (a.screenshot) await page.screenshot({ path: a.screenshot, fullPage: true });
  }
  if (a.score) {
    const base = new URL(a.url);
    for (const job of JSON.parse(fs.readFileSync(a.score, 'utf8'))) {
      const u = new URL(base);
      u.searchParams.set('export', job.export);
      await load(u.href);
      result.scores.push(await page.evaluate((tokens) => window.rwkvScore(tokens), job.tokens));
    }
  }
} finally {
  await browser.close();
}
process.stdout.write(`${JSON.stringify(result)}\n`);
