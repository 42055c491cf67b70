// netlab's plan: a lab spec validated and turned into names, addresses, routes and NAT rules (pure; no system calls).
//
// Every node (host or router) is a network namespace. Link i is one Ethernet segment 10.77.i.0/24 with a at .1
// and b at .2; a shaped link (rate or delay) runs through a hidden "wire" namespace between the two ends.
// Routes are static, from a breadth-first search that never crosses a NAT router from outside to its inside,
// so nothing outside a NAT has a route to the private side (as on the internet).

/** `cone`: endpoint-independent mapping (the source port is kept), replies and TCP simultaneous open let in:
 *  hole punching works. `strict`: a random source port per connection (endpoint-dependent mapping) and every
 *  unsolicited inbound packet dropped, inbound SYNs included: only a relay reaches the hosts behind it. */
export type NatKind = 'cone' | 'strict';
export const NAT_KINDS: readonly NatKind[] = ['cone', 'strict'];

export interface LinkSpec {
  a: string;
  b: string;
  /** rate limit a→b in Mbit/s (L2 frame bytes, as tc counts); unlimited when absent */
  rateMbit?: number;
  /** ONE-WAY delay a→b in ms (the round trip over this link is delayMs + delayMsBA) */
  delayMs?: number;
  /** b→a rate, when it differs from rateMbit */
  rateMbitBA?: number;
  /** b→a one-way delay, when it differs from delayMs */
  delayMsBA?: number;
  /** the shaper's queue per direction in bytes (tail drop beyond it); default max(64 KiB, 1.5 × rate × RTT) */
  queueBytes?: number;
  /** b must be a router: this link is the inside of its NAT of this kind */
  natKind?: NatKind;
}

export interface LabSpec {
  hosts: string[];
  routers?: string[];
  links: LinkSpec[];
  /** first two octets of the links outside every NAT (default '10.77'; NAT insides are always 10.77.i.0/24).
   *  libp2p treats every non-global range as private (it drops such observed addresses and DCUtR will not
   *  punch to them), so a NAT test puts its "internet" in a global-looking range: it exists only inside the
   *  lab's namespaces, which have no route out. */
  publicPrefix?: string;
}

export class NetlabSpecError extends Error {
  override readonly name = 'NetlabSpecError';
}

export const MAX_NODES = 64;
export const MAX_LINKS = 256;
const NAME_RE = /^[a-z][a-z0-9]{0,11}$/;
export const MIN_RATE_MBIT = 0.01;      // 10 kbit/s: tc gets whole kbit/s
export const MAX_RATE_MBIT = 100_000;
export const MAX_DELAY_MS = 10_000;

export interface PlannedLink {
  index: number;
  a: string;
  b: string;
  subnet: string;            // 10.77.i.0/24 (outside NATs: <publicPrefix>.i.0/24)
  addrA: string;
  addrB: string;
  ifA: string;               // interface names inside a's and b's namespaces
  ifB: string;
  macA: string;              // fixed, locally administered: the ends know each other without ARP
  macB: string;
  rateAB?: number;           // Mbit/s
  rateBA?: number;
  delayABus: number;
  delayBAus: number;
  queueBytes: number;
  /** a wire namespace when the link is shaped: ends wireA (facing a) and wireB (facing b) */
  wire?: { ns: string; wireA: string; wireB: string; bridge: string };
  natKind?: NatKind;
}

export interface PlannedNode {
  name: string;
  kind: 'host' | 'router';
  ns: string;
  links: number[];           // link indices in spec order
  routes: { dest: string; via: string; dev: string }[];
  nat?: { kind: NatKind; inside: string[]; outside: string[] };
}

export interface Plan {
  prefix: string;
  nodes: Map<string, PlannedNode>;
  links: PlannedLink[];
}

function inRange(v: number | undefined, what: string, min: number, max: number): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max)
    throw new NetlabSpecError(`${what} must be a number in [${min}, ${max}], got ${String(v)}`);
  return v;
}

/** Validates spec and lays it out under the run's name prefix (which every namespace and interface carries). */
export function planLab(spec: LabSpec, prefix: string): Plan {
  const routers = spec.routers ?? [];
  const nodes = new Map<string, PlannedNode>();
  if (!Array.isArray(spec.hosts) || !Array.isArray(spec.links)) throw new NetlabSpecError('lab spec: hosts and links must be arrays');
  if (spec.hosts.length + routers.length > MAX_NODES) throw new NetlabSpecError(`lab spec: at most ${MAX_NODES} nodes`);
  if (spec.links.length > MAX_LINKS) throw new NetlabSpecError(`lab spec: at most ${MAX_LINKS} links`);
  for (const [kind, names] of [['host', spec.hosts], ['router', routers]] as const) {
    for (const name of names) {
      if (typeof name !== 'string' || !NAME_RE.test(name)) throw new NetlabSpecError(`lab spec: ${kind} name "${String(name)}" must match ${NAME_RE}`);
      if (nodes.has(name)) throw new NetlabSpecError(`lab spec: node "${name}" is named twice`);
      nodes.set(name, { name, kind, ns: `${prefix}-${name}`, links: [], routes: [] });
    }
  }
  const publicPrefix = spec.publicPrefix ?? '10.77';
  if (typeof publicPrefix !== 'string' || !/^(25[0-5]|2[0-4]\d|1?\d?\d)\.(25[0-5]|2[0-4]\d|1?\d?\d)$/.test(publicPrefix) || /^(127|0|22[4-9]|2[3-5]\d)\./.test(publicPrefix))
    throw new NetlabSpecError(`lab spec: publicPrefix must be two octets "a.b" of a unicast range, got "${String(publicPrefix)}"`);
  const links: PlannedLink[] = spec.links.map((l, index) => {
    const where = `lab spec: links[${index}] (${String(l?.a)}–${String(l?.b)})`;
    const na = nodes.get(l?.a), nb = nodes.get(l?.b);
    if (!na || !nb) throw new NetlabSpecError(`${where}: ${!na ? `a "${String(l?.a)}"` : `b "${String(l?.b)}"`} is not a host or router of the spec`);
    if (na === nb) throw new NetlabSpecError(`${where}: a link needs two different nodes`);
    if (l.natKind !== undefined) {
      if (!NAT_KINDS.includes(l.natKind)) throw new NetlabSpecError(`${where}: natKind must be one of ${NAT_KINDS.join(', ')}, got "${String(l.natKind)}"`);
      if (nb.kind !== 'router') throw new NetlabSpecError(`${where}: natKind needs b to be a router (the NAT), "${nb.name}" is a host`);
    }
    const rateAB = inRange(l.rateMbit, `${where}: rateMbit`, MIN_RATE_MBIT, MAX_RATE_MBIT);
    const rateBA = inRange(l.rateMbitBA, `${where}: rateMbitBA`, MIN_RATE_MBIT, MAX_RATE_MBIT) ?? rateAB;
    const delayAB = inRange(l.delayMs, `${where}: delayMs`, 0, MAX_DELAY_MS) ?? 0;
    const delayBA = inRange(l.delayMsBA, `${where}: delayMsBA`, 0, MAX_DELAY_MS) ?? delayAB;
    const rttS = (delayAB + delayBA) / 1000;
    const bdp = Math.max(rateAB ?? 0, rateBA ?? 0) * 1e6 / 8 * rttS;
    const queueBytes = inRange(l.queueBytes, `${where}: queueBytes`, 4096, 1 << 30) ?? Math.max(64 << 10, Math.ceil(1.5 * bdp));
    const tag = `${prefix}l${index.toString(36)}`;       // <= 10 + 1 + 2 chars, + 1 below: within IFNAMSIZ (15)
    const shaped = rateAB !== undefined || rateBA !== undefined || delayAB > 0 || delayBA > 0;
    na.links.push(index);
    nb.links.push(index);
    return {
      index, a: na.name, b: nb.name, ...((net) => ({ subnet: `${net}.0/24`, addrA: `${net}.1`, addrB: `${net}.2` }))(`${l.natKind ? '10.77' : publicPrefix}.${index}`),
      ifA: `${tag}a`, ifB: `${tag}b`, macA: mac(index, 1), macB: mac(index, 2), rateAB, rateBA,
      delayABus: Math.round(delayAB * 1000), delayBAus: Math.round(delayBA * 1000), queueBytes,
      wire: shaped ? { ns: `${prefix}-w${index}`, wireA: `${tag}x`, wireB: `${tag}y`, bridge: `${tag}w` } : undefined,
      natKind: l.natKind,
    };
  });
  for (const node of nodes.values()) {
    if (node.links.length === 0) throw new NetlabSpecError(`lab spec: node "${node.name}" has no link`);
    const inside = node.links.filter(i => links[i].b === node.name && links[i].natKind);
    if (inside.length) {
      const kinds = new Set(inside.map(i => links[i].natKind));
      if (kinds.size > 1) throw new NetlabSpecError(`lab spec: router "${node.name}" is the NAT of links with different natKind`);
      const outside = node.links.filter(i => !inside.includes(i));
      if (!outside.length) throw new NetlabSpecError(`lab spec: NAT router "${node.name}" has no outside link`);
      node.nat = { kind: links[inside[0]].natKind!, inside: inside.map(i => links[i].ifB), outside: outside.map(i => ifOf(links[i], node.name)) };
    }
  }
  for (const node of nodes.values()) node.routes = routesFrom(node, nodes, links);
  return { prefix, nodes, links };
}

const hex2 = (n: number): string => n.toString(16).padStart(2, '0');
const mac = (link: number, end: number): string => `02:77:00:${hex2(link)}:00:${hex2(end)}`;
const ifOf = (l: PlannedLink, node: string): string => (l.a === node ? l.ifA : l.ifB);
const addrOf = (l: PlannedLink, node: string): string => (l.a === node ? l.addrA : l.addrB);
const peerOf = (l: PlannedLink, node: string): string => (l.a === node ? l.b : l.a);
const isInside = (l: PlannedLink, router: string): boolean => l.b === router && l.natKind !== undefined;

/** Static routes of one node: to every subnet behind a router, and to every host address, it can reach. */
function routesFrom(start: PlannedNode, nodes: Map<string, PlannedNode>, links: PlannedLink[]): PlannedNode['routes'] {
  // state: a node and whether it was entered from outside a NAT (then its inside links are closed)
  type State = { node: string; restricted: boolean; first: { via: string; dev: string } | null };
  const seen = new Set<string>([`${start.name}:false`]);
  const queue: State[] = [{ node: start.name, restricted: false, first: null }];
  const routes = new Map<string, { dest: string; via: string; dev: string }>();
  const direct = new Set(start.links.map(i => links[i].subnet));
  for (let qi = 0; qi < queue.length && qi < 4 * MAX_NODES; qi++) {
    const s = queue[qi];
    const n = nodes.get(s.node)!;
    if (s.first) {
      for (const li of n.links) {
        const l = links[li];
        if (s.restricted && isInside(l, n.name)) continue;
        // a router forwards onto its subnets; a host is reachable only at its own address
        const dest = n.kind === 'router' ? l.subnet : `${addrOf(l, n.name)}/32`;
        if (!direct.has(l.subnet) && !routes.has(dest)) routes.set(dest, { dest, ...s.first });
      }
    }
    if (n.kind === 'host' && s.first) continue;          // hosts do not forward
    for (const li of n.links) {
      const l = links[li];
      if (s.restricted && isInside(l, n.name)) continue;
      const next = peerOf(l, n.name);
      const nn = nodes.get(next)!;
      const restricted = nn.nat !== undefined && !isInside(l, next);
      const key = `${next}:${restricted}`;
      if (next === start.name || seen.has(key)) continue;
      seen.add(key);
      queue.push({ node: next, restricted, first: s.first ?? { via: addrOf(l, next), dev: ifOf(l, n.name) } });
    }
  }
  // a host's /32 is redundant where a router on its subnet already gives a route to the whole subnet
  const subnets = new Set([...routes.keys()].filter(d => d.endsWith('/24')));
  return [...routes.values()].filter(r => !r.dest.endsWith('/32') || !subnets.has(r.dest.replace(/\.\d+\/32$/, '.0/24')));
}

/** The nftables ruleset of a NAT router (one table, in the router's own namespace). */
export function natRuleset(nat: NonNullable<PlannedNode['nat']>): string {
  const inside = `{ ${nat.inside.map(i => `"${i}"`).join(', ')} }`;
  const strict = nat.kind === 'strict';
  return [
    'table ip netlab {',
    '  chain postrouting {',
    '    type nat hook postrouting priority srcnat; policy accept;',
    // cone: Linux keeps the source port when it is free (endpoint-independent mapping); strict: random ports
    `    iifname ${inside} oifname != ${inside} masquerade${strict ? ' random' : ''}`,
    '  }',
    '  chain forward {',
    '    type filter hook forward priority filter; policy accept;',
    // strict: an inbound SYN is unsolicited even when it matches a mapping (no TCP simultaneous open)
    ...(strict ? [`    oifname ${inside} iifname != ${inside} tcp flags & (syn | ack) == syn drop`] : []),
    `    oifname ${inside} iifname != ${inside} ct state established,related accept`,
    `    oifname ${inside} iifname != ${inside} drop`,
    '  }',
    '  chain input {',
    '    type filter hook input priority filter; policy accept;',
    `    iifname != ${inside} iifname != "lo" ct state established,related accept`,
    `    iifname != ${inside} iifname != "lo" drop`,
    '  }',
    '}',
    '',
  ].join('\n');
}
