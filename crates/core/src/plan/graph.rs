//! The stage DAG (petgraph): edges from each upstream to its dependents, and the selections
//! `--until` (a stage and everything it needs) and `--only` (just the stage).
use crate::pipeline::Pipeline;
use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::BTreeSet;

/// A pipeline with its graph.
pub struct Plan {
    pub pipeline: Pipeline,
    pub graph: DiGraph<usize, ()>,
    nodes: Vec<NodeIndex>,
}

/// A stage name given to `--until`, `--only`, `--force`, `explain` or `show` matched nothing.
#[derive(Debug, thiserror::Error)]
#[error("pipeline `{pipeline}` has no stage `{pattern}` (stages: {known})")]
pub struct UnknownStage {
    pub pipeline: String,
    pub pattern: String,
    pub known: String,
}

impl Plan {
    pub fn new(pipeline: Pipeline) -> Self {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..pipeline.stages.len())
            .map(|i| graph.add_node(i))
            .collect();
        for (index, stage) in pipeline.stages.iter().enumerate() {
            for (_, upstream) in stage.refs.values().flatten() {
                graph.update_edge(nodes[*upstream], nodes[index], ());
            }
        }
        Self {
            pipeline,
            graph,
            nodes,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Direct upstream stages of `index`.
    pub fn upstream(&self, index: usize) -> Vec<usize> {
        self.neighbors(index, Direction::Incoming)
    }

    /// Direct dependents of `index`.
    pub fn downstream(&self, index: usize) -> Vec<usize> {
        self.neighbors(index, Direction::Outgoing)
    }

    fn neighbors(&self, index: usize, direction: Direction) -> Vec<usize> {
        let mut list: Vec<usize> = self
            .graph
            .neighbors_directed(self.nodes[index], direction)
            .map(|n| self.graph[n])
            .collect();
        list.sort_unstable();
        list
    }

    /// `index` and everything upstream of it.
    pub fn ancestors(&self, index: usize) -> BTreeSet<usize> {
        self.closure(index, Direction::Incoming)
    }

    /// `index` and everything downstream of it.
    pub fn descendants(&self, index: usize) -> BTreeSet<usize> {
        self.closure(index, Direction::Outgoing)
    }

    fn closure(&self, index: usize, direction: Direction) -> BTreeSet<usize> {
        let mut seen = BTreeSet::from([index]);
        let mut stack = vec![index];
        while let Some(current) = stack.pop() {
            for next in self.neighbors(current, direction) {
                if seen.insert(next) {
                    stack.push(next);
                }
            }
        }
        seen
    }

    /// Stages matching a name or id, or an error listing the stages.
    pub fn find(&self, pattern: &str) -> Result<Vec<usize>, UnknownStage> {
        let found = self.pipeline.select(pattern);
        if found.is_empty() {
            let mut names: Vec<&str> = self
                .pipeline
                .stages
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            names.dedup();
            return Err(UnknownStage {
                pipeline: self.pipeline.name.clone(),
                pattern: pattern.to_string(),
                known: names.join(", "),
            });
        }
        Ok(found)
    }

    /// Which stages a run covers: all, or those `--until` needs, or exactly `--only`.
    pub fn selection(&self, until: &[String], only: &[String]) -> Result<Vec<bool>, UnknownStage> {
        if until.is_empty() && only.is_empty() {
            return Ok(vec![true; self.len()]);
        }
        let mut selected = vec![false; self.len()];
        for pattern in until {
            for index in self.find(pattern)? {
                for ancestor in self.ancestors(index) {
                    selected[ancestor] = true;
                }
            }
        }
        for pattern in only {
            for index in self.find(pattern)? {
                selected[index] = true;
            }
        }
        Ok(selected)
    }

    /// Mermaid flowchart text.
    pub fn mermaid(&self) -> String {
        let mut text = String::from("flowchart LR\n");
        for (index, stage) in self.pipeline.stages.iter().enumerate() {
            text.push_str(&format!(
                "  s{index}[\"{} ({})\"]\n",
                stage.id.replace('"', "'"),
                stage.kind.kind()
            ));
        }
        for edge in self.graph.edge_indices() {
            if let Some((a, b)) = self.graph.edge_endpoints(edge) {
                text.push_str(&format!("  s{} --> s{}\n", self.graph[a], self.graph[b]));
            }
        }
        text
    }

    /// Graphviz dot text.
    pub fn dot(&self) -> String {
        let mut text = format!("digraph \"{}\" {{\n  rankdir=LR;\n", self.pipeline.name);
        for stage in &self.pipeline.stages {
            text.push_str(&format!(
                "  \"{}\" [label=\"{}\\n{}\"];\n",
                stage.id,
                stage.id,
                stage.kind.kind()
            ));
        }
        for edge in self.graph.edge_indices() {
            if let Some((a, b)) = self.graph.edge_endpoints(edge) {
                let (a, b) = (
                    &self.pipeline.stages[self.graph[a]].id,
                    &self.pipeline.stages[self.graph[b]].id,
                );
                text.push_str(&format!("  \"{a}\" -> \"{b}\";\n"));
            }
        }
        text.push_str("}\n");
        text
    }
}
