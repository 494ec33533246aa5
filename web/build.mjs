// Build the bundle into the Python package (src/cellmux/web/static).
// `npm run build`, or `tox -e web`. The output is committed: a server
// installed from a wheel or a clone needs no npm.
import { build } from 'esbuild';
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, '..', 'src', 'cellmux', 'web', 'static');
rmSync(out, { recursive: true, force: true });
mkdirSync(join(out, 'fonts'), { recursive: true });

await build({
  entryPoints: [join(here, 'src', 'index.js')],
  bundle: true, format: 'iife', globalName: 'cellmux', minify: true,
  target: ['es2020'], outfile: join(out, 'cellmux.js'), legalComments: 'linked',
});
// The widget frame (docs/browser.md, Widgets): html-manager and its CSS and
// fonts, loaded by static/widgets.html inside a sandboxed iframe.
// html-manager asks for ipywidgets 7's CSS only when it meets a version 7
// widget, which a bundle cannot do lazily: left in, its rules fight those of
// ipywidgets 8 (sliders, readouts). Version 7 widgets still work, unstyled.
const noWidgets7Css = {
  name: 'no-widgets7-css',
  setup(b) {
    b.onResolve({ filter: /^@jupyter-widgets\/controls7\/css\// }, (args) => ({ path: args.path, namespace: 'empty-css' }));
    b.onLoad({ filter: /.*/, namespace: 'empty-css' }, () => ({ contents: '', loader: 'css' }));
  },
};
await build({
  plugins: [noWidgets7Css],
  entryPoints: [join(here, 'src', 'widgets', 'frame.js')],
  bundle: true, format: 'iife', minify: true, target: ['es2020'],
  outfile: join(out, 'widgets.js'), legalComments: 'linked',
  loader: { '.woff2': 'file', '.woff': 'empty', '.ttf': 'empty', '.eot': 'empty', '.svg': 'empty' },
  assetNames: 'fonts/[name]-[hash]',
  define: { 'process.env.NODE_ENV': '"production"' },
  // html-manager's embedding code assigns webpack's asset path; we have no webpack.
  banner: { js: 'var __webpack_public_path__ = "";' },
});
await build({
  entryPoints: [join(here, 'src', 'console-start.js')],
  bundle: false, minify: true, outfile: join(out, 'console-start.js'),
});

// KaTeX's CSS with its fonts beside it (woff2 only: every current browser).
const katexDir = join(here, 'node_modules', 'katex', 'dist');
const katexCss = readFileSync(join(katexDir, 'katex.min.css'), 'utf8')
  .replace(/,url\(fonts\/[^)]+\.woff\) format\("woff"\)/g, '')
  .replace(/,url\(fonts\/[^)]+\.ttf\) format\("truetype"\)/g, '');
for (const name of readFileSync(join(katexDir, 'katex.min.css'), 'utf8').match(/fonts\/[^)]+\.woff2/g)) {
  cpSync(join(katexDir, name), join(out, name));
}
const own = readFileSync(join(here, 'src', 'style.css'), 'utf8');
writeFileSync(join(out, 'cellmux.css'), katexCss + '\n' + own);
cpSync(join(here, 'console.html'), join(out, 'console.html'));
cpSync(join(here, 'widgets.html'), join(out, 'widgets.html'));
cpSync(join(here, 'favicon.svg'), join(out, 'favicon.svg'));

// The licences of everything bundled (MIT, BSD-3-Clause, ISC; Font Awesome:
// CC BY 4.0 icons, OFL fonts, MIT code), shipped beside the bundle.
import { readdirSync, existsSync } from 'node:fs';
const notices = [];
const modules = join(here, 'node_modules');
const packages = readdirSync(modules).filter((n) => !n.startsWith('.')).flatMap((name) => (name.startsWith('@')
  ? readdirSync(join(modules, name)).map((sub) => `${name}/${sub}`) : [name]));
for (const name of packages.sort()) {
  const meta = JSON.parse(readFileSync(join(modules, name, 'package.json'), 'utf8'));
  if (name === 'esbuild' || name.startsWith('@esbuild/') || name === 'commander') continue; // build tools
  const file = ['LICENSE', 'LICENSE.md', 'LICENSE.txt'].map((f) => join(modules, name, f)).find(existsSync);
  notices.push(`== ${name} ${meta.version} (${meta.license})\n\n${file ? readFileSync(file, 'utf8') : ''}`);
}
writeFileSync(join(out, 'THIRD_PARTY_LICENSES.txt'), notices.join('\n\n'));
