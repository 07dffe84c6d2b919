//! Person sets as DataFusion functions: a criterion's matching patients become one roaring
//! bitmap (serialized in a `Binary` value) and criteria combine by set algebra.
//!
//! | function | kind | meaning |
//! |---|---|---|
//! | `person_set(person_id)` | aggregate | the set of `person_id`s of the input rows |
//! | `set_and(a, b)` | scalar | a ∩ b |
//! | `set_or(a, b)` | scalar | a ∪ b |
//! | `set_minus(a, b)` | scalar | a − b |
//! | `set_at_least(n, a, b, ...)` | scalar | persons in at least `n` of the sets |
//! | `set_count(a)` | scalar | \|a\| as `BIGINT` |
//!
//! Combining 1-row sets costs microseconds where a join of person ids would cost a hash
//! table per criterion; every count of the attrition table comes out of one plan.

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

/// `person_set(person_id)`: the set of the input rows' person ids.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PersonSet {
    signature: Signature,
}

impl AggregateUDFImpl for PersonSet {
    fn name(&self) -> &str {
        "person_set"
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
        Ok(Box::new(SetAccumulator::default()))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[set]", args.name),
            DataType::Binary,
            true,
        ))])
    }
}

#[derive(Debug, Default)]
struct SetAccumulator {
    set: RoaringBitmap,
}

impl Accumulator for SetAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        insert_ids(&mut self.set, values[0].as_primitive::<Int64Type>());
        Ok(())
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
        for bytes in states[0].as_binary::<i32>().iter().flatten() {
            self.set |= decode(bytes)?;
        }
        Ok(())
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
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let (n, sets) = if self.op == SetOp::AtLeast {
            let n = match &args.args[0] {
                ColumnarValue::Scalar(ScalarValue::Int64(Some(n))) if *n >= 1 => *n as usize,
                _ => return exec_err!("set_at_least needs a literal n >= 1"),
            };
            (n, &arrays[1..])
        } else {
            (0, &arrays[..])
        };
        let sets: Vec<&BinaryArray> = sets
            .iter()
            .map(|a| {
                a.as_binary_opt::<i32>()
                    .ok_or_else(|| DataFusionError::Execution("a person set must be Binary".into()))
            })
            .collect::<Result<_>>()?;
        if self.op == SetOp::Count {
            let mut out = Vec::with_capacity(rows);
            for row in 0..rows {
                out.push(decode(sets[0].value(row))?.len() as i64);
            }
            return Ok(ColumnarValue::Array(Arc::new(Int64Array::from(out))));
        }
        let mut out = BinaryBuilder::with_capacity(rows, 0);
        for row in 0..rows {
            let mut inputs = sets.iter().map(|s| decode(s.value(row)));
            let set = match self.op {
                SetOp::And => inputs.next().expect("2 args")? & inputs.next().expect("2 args")?,
                SetOp::Or => inputs.next().expect("2 args")? | inputs.next().expect("2 args")?,
                SetOp::Minus => inputs.next().expect("2 args")? - inputs.next().expect("2 args")?,
                SetOp::AtLeast => at_least(n, inputs.collect::<Result<Vec<_>>>()?),
                SetOp::Count => unreachable!("handled above"),
            };
            out.append_value(encode(&set));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// Persons in at least `n` of `sets`: `covered[k]` holds persons in at least `k + 1` of the
/// sets seen so far.
fn at_least(n: usize, sets: Vec<RoaringBitmap>) -> RoaringBitmap {
    if n > sets.len() {
        return RoaringBitmap::new();
    }
    let mut covered: Vec<RoaringBitmap> = vec![RoaringBitmap::new(); n];
    for s in sets {
        for k in (1..n).rev() {
            let promoted = &covered[k - 1] & &s;
            covered[k] |= promoted;
        }
        covered[0] |= s;
    }
    covered.pop().unwrap_or_default()
}

static PERSON_SET: LazyLock<Arc<AggregateUDF>> = LazyLock::new(|| {
    Arc::new(AggregateUDF::new_from_impl(PersonSet {
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
        let sets = vec![set(&[1, 2, 3]), set(&[2, 3, 4]), set(&[3, 4, 5])];
        assert_eq!(at_least(1, sets.clone()), set(&[1, 2, 3, 4, 5]));
        assert_eq!(at_least(2, sets.clone()), set(&[2, 3, 4]));
        assert_eq!(at_least(3, sets.clone()), set(&[3]));
        assert_eq!(at_least(4, sets), set(&[]));
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
