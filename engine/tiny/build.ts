// Regenerates the committed text files of the tiny model (engine/tiny/data/*.json) from the bundled dataset.
// Run: node engine/tiny/build.ts   (tests/tiny-files.test.ts checks the committed files match a rebuild)
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { buildTinyFiles, TINY_DATA_DIR } from './files.ts';

if (import.meta.main) {
  const { files, info } = buildTinyFiles();
  for (const [name, text] of Object.entries(files)) writeFileSync(join(TINY_DATA_DIR, name), text);
  console.log(`wrote ${Object.keys(files).join(', ')} to ${TINY_DATA_DIR}; vocab ${info.vocabSize}, bos ${info.bosTokenId}, eos ${info.eosTokenIds.join('/')}, pad ${info.padTokenId}`);
}
