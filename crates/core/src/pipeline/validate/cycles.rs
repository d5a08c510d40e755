//! The stage graph's order, or its cycles: stages in an order where every upstream comes first
//! (following the file where the edges allow), or one message per cycle.
use crate::pipeline::StageDraft;
use std::collections::{BTreeMap, BTreeSet};

/// The declaration-friendly topological order, or (first stage of the cycle, message) for each
/// cycle.
pub(super) fn order(drafts: &[StageDraft]) -> Result<Vec<usize>, Vec<(String, String)>> {
    let index: BTreeMap<&str, usize> = drafts
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let mut graph = petgraph::graph::DiGraph::<usize, ()>::new();
    let nodes: Vec<_> = (0..drafts.len()).map(|i| graph.add_node(i)).collect();
    for (i, draft) in drafts.iter().enumerate() {
        for upstream in draft.refs.values().flatten() {
            if let Some(&u) = index.get(upstream.as_str()) {
                graph.update_edge(nodes[u], nodes[i], ());
            }
        }
    }
    if petgraph::algo::toposort(&graph, None).is_ok() {
        return Ok(declaration_order_topological(drafts, &index));
    }
    let mut cycles = Vec::new();
    for component in petgraph::algo::tarjan_scc(&graph) {
        if component.len() < 2 {
            continue;
        }
        let members: BTreeSet<usize> = component.iter().map(|n| graph[*n]).collect();
        let cycle = cycle_path(drafts, &members, &index);
        let text: Vec<&str> = (cycle.iter().chain(cycle.first()))
            .map(|&i| drafts[i].name.as_str())
            .collect();
        let first = drafts[cycle[0]].name.clone();
        cycles.push((first, format!("stages form a cycle: {}", text.join(" → "))));
    }
    Err(cycles)
}

/// Kahn's algorithm picking the earliest-declared ready stage first, so output order follows
/// the file wherever the edges allow.
fn declaration_order_topological(
    drafts: &[StageDraft],
    index: &BTreeMap<&str, usize>,
) -> Vec<usize> {
    let upstreams: Vec<BTreeSet<usize>> = drafts
        .iter()
        .map(|d| {
            d.refs
                .values()
                .flatten()
                .filter_map(|u| index.get(u.as_str()).copied())
                .collect()
        })
        .collect();
    let mut waiting: Vec<usize> = upstreams.iter().map(BTreeSet::len).collect();
    let mut ready: BTreeSet<usize> = (0..drafts.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(drafts.len());
    while let Some(next) = ready.pop_first() {
        order.push(next);
        for (dependent, ups) in upstreams.iter().enumerate() {
            if ups.contains(&next) {
                waiting[dependent] -= 1;
                if waiting[dependent] == 0 {
                    ready.insert(dependent);
                }
            }
        }
    }
    order
}

/// Walks a strongly connected component from its first-declared stage back to it.
fn cycle_path(
    drafts: &[StageDraft],
    members: &BTreeSet<usize>,
    index: &BTreeMap<&str, usize>,
) -> Vec<usize> {
    let Some(&start) = members.iter().next() else {
        return Vec::new();
    };
    let mut path = vec![start];
    let mut current = start;
    // Follow downstream edges (stage → a member that depends on it), preferring the lowest index.
    loop {
        let next = members.iter().copied().find(|&m| {
            drafts[m]
                .refs
                .values()
                .flatten()
                .any(|u| index.get(u.as_str()) == Some(&current))
                && (m == start || !path.contains(&m))
        });
        match next {
            Some(m) if m == start => break,
            Some(m) => {
                path.push(m);
                current = m;
            }
            None => break,
        }
    }
    path
}

impl super::Checker<'_> {
    /// Orders stages so every upstream comes first; reports each cycle by its stages.
    pub(super) fn check_cycles(&mut self, drafts: &[StageDraft]) -> Option<Vec<usize>> {
        match order(drafts) {
            Ok(order) => Some(order),
            Err(found) => {
                for (first, message) in found {
                    self.report(&["stages", &first], Some(&first), None, message);
                }
                None
            }
        }
    }
}
