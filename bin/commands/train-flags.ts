// The training keys as command-line flags (kebab-case of run.json's snake_case keys), shared by `train` and `launch`.
import type { Command } from 'commander';
import { DEFAULT_TRAIN_CONFIG, TRAIN_CONFIG_KEYS, kebab, resolveTrainConfig } from '../../engine/train/config.ts';
import type { TrainConfig } from '../../engine/train/config.ts';

/** commander's name for a flag's value: lora_r → loraR */
function camel(key: string): string {
  return key.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

/** Register every TrainConfig key as a flag: --kebab-case <value>, booleans as --x / --no-x. `train`'s help
 *  shows each key's choices and default; `launch`'s only the key's help (the run spec resolves the rest). */
export function addTrainFlags(cmd: Command, help: 'train' | 'launch'): void {
  for (const spec of TRAIN_CONFIG_KEYS) {
    const flag = kebab(spec.key);
    const def = DEFAULT_TRAIN_CONFIG[spec.key];
    const defText = Array.isArray(def) ? (def.length > 0 ? def.join(',') : 'none') : String(def);
    if (spec.kind === 'bool') {
      cmd.option(`--${flag}`, help === 'train' ? `${spec.help} (default ${defText})` : spec.help);
      cmd.option(`--no-${flag}`, help === 'train' ? `disable --${flag}` : `disable ${flag}`);
    } else {
      const choices = spec.values ? ` [${spec.values.join('|')}]` : '';
      cmd.option(`--${flag} <value>`, help === 'train' ? `${spec.help}${choices} (default ${defText})` : spec.help);
    }
  }
}

/** The training flags given on the command line, by their snake_case keys (what resolveTrainConfig takes). */
export function trainFlagValues(opts: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const spec of TRAIN_CONFIG_KEYS) {
    const v = opts[camel(spec.key)];
    if (v !== undefined) out[spec.key] = v;
  }
  return out;
}

/** Parse argv-style flags into a TrainConfig (what `swarmtune train` does before training; used by tests). */
export function trainConfigFromOptions(opts: Record<string, unknown>): TrainConfig {
  return resolveTrainConfig({ configFile: (opts.config as string | undefined) ?? null, flags: trainFlagValues(opts) });
}
