//! Person sets as DataFusion functions: a criterion's matching patients become one roaring
//! bitmap (serialized in a `Binary` value) and criteria combine by set algebra.
//!
//! | function | kind | meaning |
//! |---|---|---|
//! | `person_set(person_id)` | aggregate | the set of `person_id`s of the input rows |
//! | `set_union(persons)` | aggregate | the union of the input rows' sets |
//! | `set_and(a, b)` | scalar | a ∩ b |
//! | `set_or(a, b)` | scalar | a ∪ b |
//! | `set_minus(a, b)` | scalar | a − b |
//! | `set_at_least(n, a, b, ...)` | scalar | persons in at least `n` of the sets |
//! | `set_count(a)` | scalar | \|a\| as `BIGINT` |
//!
//! Combining 1-row sets costs microseconds where a join of person ids would cost a hash
//! table per criterion; every count of the attrition table comes out of one plan.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, Int64Array};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type};
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};
use roaring::RoaringBitmap;

/// Serializes a set for a `Binary` value.
pub(crate) fn encode(set: &RoaringBitmap) -> Vec<u8> {
    let mut out = Vec::with_capacity(set.serialized_size());
    set.serialize_into(&mut out).expect("write to a Vec");
    out
}

/// Reads a set written by [`encode`].
pub(crate) fn decode(bytes: &[u8]) -> Result<RoaringBitmap> {
    RoaringBitmap::deserialize_from(bytes)
        .map_err(|e| DataFusionError::Execution(format!("not a person set: {e}")))
}

/// Adds the ids of an `Int64` array to a set (ids were range-checked on the way in).
pub(crate) fn insert_ids(set: &mut RoaringBitmap, ids: &Int64Array) {
    let values = ids.values();
    let sorted_after = ids.null_count() == 0
        && values.is_sorted()
        && values
            .first()
            .is_some_and(|&f| set.max().is_none_or(|m| f > i64::from(m)));
    if sorted_after {
        let mut last = None;
        let iter = values.iter().filter_map(|&v| {
            let v = v as u32;
            (last != Some(v)).then(|| {
                last = Some(v);
                v
            })
        });
        set.append(iter).expect("sorted and above the maximum");
    } else {
        for v in ids.iter().flatten() {
            set.insert(v as u32);
        }
    }
}

/// What a set aggregate collects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SetInput {
    /// `person_set(person_id)`: the set of the input rows' person ids.
    Ids,
    /// `set_union(persons)`: the union of the input rows' person sets.
    Sets,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SetAggregate {
    input: SetInput,
    signature: Signature,
}

impl AggregateUDFImpl for SetAggregate {
    fn name(&self) -> &str {
        match self.input {
            SetInput::Ids => "person_set",
            SetInput::Sets => "set_union",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Binary)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(SetAccumulator {
            input: self.input,
            set: RoaringBitmap::new(),
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[set]", args.name),
            DataType::Binary,
            true,
        ))])
    }
}

#[derive(Debug)]
struct SetAccumulator {
    input: SetInput,
    set: RoaringBitmap,
}

impl SetAccumulator {
    fn union(&mut self, sets: &ArrayRef) -> Result<()> {
        for bytes in sets.as_binary::<i32>().iter().flatten() {
            self.set |= decode(bytes)?;
        }
        Ok(())
    }
}

impl Accumulator for SetAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        match self.input {
            SetInput::Ids => {
                insert_ids(&mut self.set, values[0].as_primitive::<Int64Type>());
                Ok(())
            }
            SetInput::Sets => self.union(&values[0]),
        }
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Binary(Some(encode(&self.set))))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.set.serialized_size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.union(&states[0])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SetOp {
    And,
    Or,
    Minus,
    AtLeast,
    Count,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SetFn {
    op: SetOp,
    signature: Signature,
}

impl ScalarUDFImpl for SetFn {
    fn name(&self) -> &str {
        match self.op {
            SetOp::And => "set_and",
            SetOp::Or => "set_or",
            SetOp::Minus => "set_minus",
            SetOp::AtLeast => "set_at_least",
            SetOp::Count => "set_count",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.op {
            SetOp::Count => DataType::Int64,
            _ => DataType::Binary,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let (n, sets) = if self.op == SetOp::AtLeast {
            let n = match &args.args[0] {
                ColumnarValue::Scalar(ScalarValue::Int64(Some(n))) if *n >= 1 => *n as usize,
                _ => return exec_err!("set_at_least needs a literal n >= 1"),
            };
            (n, &args.args[1..])
        } else {
            (0, &args.args[..])
        };
        let sets: Vec<SetArg<'_>> = sets.iter().map(SetArg::new).collect::<Result<_>>()?;
        let all_scalar = sets.iter().all(|s| matches!(s, SetArg::One(_)));
        let count = if all_scalar { 1 } else { rows };
        let mut counts = Vec::new();
        let mut out = BinaryBuilder::new();
        for row in 0..count {
            let inputs: Vec<Cow<'_, RoaringBitmap>> =
                sets.iter().map(|s| s.get(row)).collect::<Result<_>>()?;
            let set = match self.op {
                SetOp::Count => {
                    counts.push(inputs[0].len() as i64);
                    continue;
                }
                SetOp::And => inputs[0].as_ref() & inputs[1].as_ref(),
                SetOp::Or => inputs[0].as_ref() | inputs[1].as_ref(),
                SetOp::Minus => inputs[0].as_ref() - inputs[1].as_ref(),
                SetOp::AtLeast => {
                    at_least(n, &inputs.iter().map(|c| c.as_ref()).collect::<Vec<_>>())
                }
            };
            out.append_value(encode(&set));
        }
        Ok(match (self.op, all_scalar) {
            (SetOp::Count, true) => ColumnarValue::Scalar(ScalarValue::Int64(Some(counts[0]))),
            (SetOp::Count, false) => ColumnarValue::Array(Arc::new(Int64Array::from(counts))),
            (_, true) => {
                let bytes = out.finish();
                ColumnarValue::Scalar(ScalarValue::Binary(Some(bytes.value(0).to_vec())))
            }
            (_, false) => ColumnarValue::Array(Arc::new(out.finish())),
        })
    }
}

/// A person-set argument: one set for every row (decoded once), or one per row.
enum SetArg<'a> {
    One(RoaringBitmap),
    Many(&'a BinaryArray),
}

impl<'a> SetArg<'a> {
    fn new(value: &'a ColumnarValue) -> Result<SetArg<'a>> {
        match value {
            ColumnarValue::Scalar(ScalarValue::Binary(Some(bytes))) => {
                Ok(SetArg::One(decode(bytes)?))
            }
            ColumnarValue::Array(a) => a
                .as_binary_opt::<i32>()
                .map(SetArg::Many)
                .ok_or_else(|| DataFusionError::Execution("a person set must be Binary".into())),
            _ => exec_err!("a person set must be a non-null Binary value"),
        }
    }

    fn get(&self, row: usize) -> Result<Cow<'_, RoaringBitmap>> {
        match self {
            SetArg::One(set) => Ok(Cow::Borrowed(set)),
            SetArg::Many(a) if a.is_valid(row) => Ok(Cow::Owned(decode(a.value(row))?)),
            SetArg::Many(_) => exec_err!("a person set must not be NULL"),
        }
    }
}

/// Persons in at least `n` of `sets`: `covered[k]` holds persons in at least `k + 1` of the
/// sets seen so far.
fn at_least(n: usize, sets: &[&RoaringBitmap]) -> RoaringBitmap {
    if n > sets.len() {
        return RoaringBitmap::new();
    }
    let mut covered: Vec<RoaringBitmap> = vec![RoaringBitmap::new(); n];
    for s in sets {
        for k in (1..n).rev() {
            let promoted = &covered[k - 1] & *s;
            covered[k] |= promoted;
        }
        covered[0] |= *s;
    }
    covered.pop().unwrap_or_default()
}

static SET_UNION: LazyLock<Arc<AggregateUDF>> = LazyLock::new(|| {
    Arc::new(AggregateUDF::new_from_impl(SetAggregate {
        input: SetInput::Sets,
        signature: Signature::exact(vec![DataType::Binary], Volatility::Immutable),
    }))
});

static PERSON_SET: LazyLock<Arc<AggregateUDF>> = LazyLock::new(|| {
    Arc::new(AggregateUDF::new_from_impl(SetAggregate {
        input: SetInput::Ids,
        signature: Signature::exact(vec![DataType::Int64], Volatility::Immutable),
    }))
});

fn scalar(op: SetOp, signature: Signature) -> Arc<ScalarUDF> {
    Arc::new(ScalarUDF::new_from_impl(SetFn { op, signature }))
}

static SET_AND: LazyLock<Arc<ScalarUDF>> = LazyLock::new(|| {
    scalar(
        SetOp::And,
        Signature::exact(
            vec![DataType::Binary, DataType::Binary],
            Volatility::Immutable,
        ),
    )
});
static SET_OR: LazyLock<Arc<ScalarUDF>> = LazyLock::new(|| {
    scalar(
        SetOp::Or,
        Signature::exact(
            vec![DataType::Binary, DataType::Binary],
            Volatility::Immutable,
        ),
    )
});
static SET_MINUS: LazyLock<Arc<ScalarUDF>> = LazyLock::new(|| {
    scalar(
        SetOp::Minus,
        Signature::exact(
            vec![DataType::Binary, DataType::Binary],
            Volatility::Immutable,
        ),
    )
});
static SET_AT_LEAST: LazyLock<Arc<ScalarUDF>> = LazyLock::new(|| {
    scalar(
        SetOp::AtLeast,
        Signature::variadic_any(Volatility::Immutable),
    )
});
static SET_COUNT: LazyLock<Arc<ScalarUDF>> = LazyLock::new(|| {
    scalar(
        SetOp::Count,
        Signature::exact(vec![DataType::Binary], Volatility::Immutable),
    )
});

use datafusion::logical_expr::{Expr, lit};

/// `person_set(expr)`.
pub(crate) fn person_set(expr: Expr) -> Expr {
    PERSON_SET.call(vec![expr])
}

/// `set_union(expr)`.
pub(crate) fn set_union(expr: Expr) -> Expr {
    SET_UNION.call(vec![expr])
}

pub(crate) fn set_and(a: Expr, b: Expr) -> Expr {
    SET_AND.call(vec![a, b])
}

pub(crate) fn set_or(a: Expr, b: Expr) -> Expr {
    SET_OR.call(vec![a, b])
}

pub(crate) fn set_minus(a: Expr, b: Expr) -> Expr {
    SET_MINUS.call(vec![a, b])
}

pub(crate) fn set_at_least(n: u32, sets: Vec<Expr>) -> Expr {
    let mut args = vec![lit(i64::from(n))];
    args.extend(sets);
    SET_AT_LEAST.call(args)
}

pub(crate) fn set_count(a: Expr) -> Expr {
    SET_COUNT.call(vec![a])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u32]) -> RoaringBitmap {
        ids.iter().copied().collect()
    }

    #[test]
    fn at_least_counts_memberships() {
        let (a, b, c) = (set(&[1, 2, 3]), set(&[2, 3, 4]), set(&[3, 4, 5]));
        let sets = [&a, &b, &c];
        assert_eq!(at_least(1, &sets), set(&[1, 2, 3, 4, 5]));
        assert_eq!(at_least(2, &sets), set(&[2, 3, 4]));
        assert_eq!(at_least(3, &sets), set(&[3]));
        assert_eq!(at_least(4, &sets), set(&[]));
    }

    #[test]
    fn ids_insert_sorted_and_unsorted() {
        let mut s = RoaringBitmap::new();
        insert_ids(&mut s, &Int64Array::from(vec![1, 1, 2, 5]));
        insert_ids(&mut s, &Int64Array::from(vec![7, 3]));
        insert_ids(&mut s, &Int64Array::from(vec![8, 9]));
        assert_eq!(s, set(&[1, 2, 3, 5, 7, 8, 9]));
        assert_eq!(decode(&encode(&s)).unwrap(), s);
    }
}
