//! A field's value against its schema entry: type, allowed values (with a suggestion), ranges.
use crate::pipeline::spec::describe;
use crate::pipeline::suggest::did_you_mean;
use crate::stages::{ParamSpec, ParamType};
use serde_json::Value;

/// The string items of a string or list-of-strings field (empty when absent).
pub(super) fn string_items(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Why `value` does not fit `spec`, if it does not.
pub fn type_error(spec: &ParamSpec, value: &Value) -> Option<String> {
    if value.is_null() && spec.default == Some(Value::Null) {
        return None;
    }
    if !fits_type(spec.ty, value) {
        return Some(format!(
            "expected {}, found {}",
            spec.ty.describe(),
            describe_misfit(spec.ty, value)
        ));
    }
    if let Some(message) = spec.allowed.and_then(|allowed| not_allowed(allowed, value)) {
        return Some(message);
    }
    numbers_of(value)
        .into_iter()
        .find_map(|(number, item)| range_error(spec, number, item))
}

fn fits_type(ty: ParamType, value: &Value) -> bool {
    let all = || {
        value
            .as_array()
            .is_some_and(|a| a.iter().all(|item| item_fits(ty, item)))
    };
    match ty {
        ParamType::String | ParamType::Path | ParamType::StageRef | ParamType::PathOrStageRef => {
            value.is_string()
        }
        ParamType::Integer => is_integer(value),
        ParamType::Number => value.is_number(),
        ParamType::Bool => value.is_boolean(),
        ParamType::StringList => all(),
        ParamType::IntegerList
        | ParamType::NumberList
        | ParamType::PathList
        | ParamType::StageRefList
        | ParamType::PathOrStageRefList => item_fits(ty, value) || all(),
    }
}

fn is_integer(value: &Value) -> bool {
    value.is_i64() || value.is_u64()
}

/// Whether one item of a list type fits (`false` for scalar types).
fn item_fits(ty: ParamType, item: &Value) -> bool {
    match ty {
        ParamType::IntegerList => is_integer(item),
        ParamType::NumberList => item.is_number(),
        ParamType::StringList
        | ParamType::PathList
        | ParamType::StageRefList
        | ParamType::PathOrStageRefList => item.is_string(),
        _ => false,
    }
}

/// The value, or for a list of a list type its first item that does not fit (`the string
/// "fast" in the list`).
fn describe_misfit(ty: ParamType, value: &Value) -> String {
    let bad_item = value
        .as_array()
        .and_then(|items| items.iter().find(|item| !item_fits(ty, item)))
        .filter(|_| is_list_type(ty));
    match bad_item {
        Some(item) => format!("{} in the list", describe(item)),
        None => describe(value),
    }
}

fn is_list_type(ty: ParamType) -> bool {
    matches!(
        ty,
        ParamType::StringList
            | ParamType::IntegerList
            | ParamType::NumberList
            | ParamType::PathList
            | ParamType::StageRefList
            | ParamType::PathOrStageRefList
    )
}

/// The first string of `value` (a string or a list of them) that is not in `allowed`.
fn not_allowed(allowed: &[&str], value: &Value) -> Option<String> {
    let items: Vec<&str> = match value {
        Value::String(text) => vec![text.as_str()],
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let bad = items.into_iter().find(|item| !allowed.contains(item))?;
    Some(format!(
        "unknown value \"{bad}\"{}",
        did_you_mean(bad, allowed)
    ))
}

/// The numbers in a scalar or a list, each with the value it came from.
fn numbers_of(value: &Value) -> Vec<(f64, &Value)> {
    match value {
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_f64().map(|n| (n, v)))
            .collect(),
        other => other.as_f64().map(|n| (n, other)).into_iter().collect(),
    }
}

fn range_error(spec: &ParamSpec, number: f64, value: &Value) -> Option<String> {
    if let Some(step) = spec.step.filter(|step| number % (*step as f64) != 0.0) {
        return Some(format!(
            "{} is not a multiple of {step} (the VAE works in blocks of 8 pixels); use {}",
            crate::pipeline::display_value(value),
            ((number / step as f64).round() as i64).max(1) * step
        ));
    }
    let below = spec.min.is_some_and(|min| number < min);
    let above = spec.max.is_some_and(|max| number > max);
    (below || above).then(|| {
        let integral = matches!(spec.ty, ParamType::Integer | ParamType::IntegerList);
        let show = |bound: f64| display_bound(bound, integral);
        let (min, max) = (spec.min.map(show), spec.max.map(show));
        let bounds = match (min, max) {
            (Some(min), Some(max)) => format!("between {min} and {max}"),
            (Some(min), None) => format!("at least {min}"),
            (None, Some(max)) => format!("at most {max}"),
            (None, None) => String::new(),
        };
        format!(
            "{} is out of range: must be {bounds}",
            crate::pipeline::display_value(value)
        )
    })
}

/// A range bound as written in messages: integers in full for integer fields (`9007199254740991`,
/// not `9.007199254740991e15`).
fn display_bound(bound: f64, integral: bool) -> String {
    /// Integers up to 2^53 are exact in an f64.
    const EXACT_LIMIT: f64 = 9_007_199_254_740_992.0;
    if integral && bound.fract() == 0.0 && bound.abs() <= EXACT_LIMIT {
        format!("{}", bound as i64)
    } else {
        crate::pipeline::display_float(bound)
    }
}
