//! `#[derive(Params)]`: a stage kind's parameter table derived from its typed struct, so a
//! field's name, type, default, range and doc are written once, on the field.
//!
//! Each named field becomes one `ParamSpec` (in field order): its name is the field's, its doc
//! the field's `///` comment (lines joined by spaces), its type the field type's
//! `FieldType::TYPE` (closed sets add their names as `one_of`). `#[param(...)]` adds the rest:
//!
//! - `default = <expr>`: optional with this default (`serde_json::json!` of the expression:
//!   `null`, `"l2"`, `[1.0]`, a constant); without it the field is required;
//! - `ty = <ParamType variant>`: the type when the Rust type does not say it (inputs);
//! - `range(<min>, <max>)`, `multiple_of = <n>`, `one_of = <names>`;
//! - flags `model_folder`, `not_in_key`, `keyed_when_set`, `gathers`;
//! - `table = <expr>` on a `#[serde(flatten)]` field: the specs it contributes (default:
//!   the flattened type's own table).
use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::quote;
use syn::parse::ParseStream;
use syn::{Attribute, Data, DeriveInput, Expr, Fields, Ident, LitStr, Token, parse_macro_input};

#[proc_macro_derive(Params, attributes(param))]
pub fn derive_params(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match table(&input) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// The `ParamTable` impl of the struct.
fn table(input: &DeriveInput) -> syn::Result<Tokens> {
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(input, "Params: only structs"));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(input, "Params: only named fields"));
    };
    let mut pushes = Vec::new();
    for field in &fields.named {
        pushes.push(field_specs(field)?);
    }
    let name = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::dreampipe_core::stages::params::ParamTable for #name #type_generics
        #where_clause
        {
            fn param_specs() -> ::std::vec::Vec<::dreampipe_core::stages::ParamSpec> {
                let mut specs = ::std::vec::Vec::new();
                #(#pushes)*
                specs
            }
        }
    })
}

/// What one `#[param(...)]` says.
#[derive(Default)]
struct FieldOptions {
    default: Option<Expr>,
    ty: Option<Ident>,
    range: Option<(Expr, Expr)>,
    multiple_of: Option<Expr>,
    one_of: Option<Expr>,
    table: Option<Expr>,
    flags: Vec<Ident>,
}

/// The statements adding one field's spec (or a flattened struct's specs) to `specs`.
fn field_specs(field: &syn::Field) -> syn::Result<Tokens> {
    let options = options(&field.attrs)?;
    let ident = field.ident.as_ref().expect("named field");
    if is_flattened(&field.attrs)? {
        let ty = &field.ty;
        let table = options.table.map(|expr| quote!(#expr)).unwrap_or_else(
            || quote!(<#ty as ::dreampipe_core::stages::params::ParamTable>::param_specs()),
        );
        return Ok(quote!(specs.extend(#table);));
    }
    let name = LitStr::new(&ident.to_string(), ident.span());
    let doc = doc_text(&field.attrs).ok_or_else(|| {
        syn::Error::new_spanned(
            ident,
            "Params: every field needs a `///` doc (its description)",
        )
    })?;
    let ty = &field.ty;
    let field_type = quote!(<#ty as ::dreampipe_core::stages::params::FieldType>);
    let param_type = match &options.ty {
        Some(variant) => quote!(::dreampipe_core::stages::ParamType::#variant),
        None => quote!(#field_type::TYPE),
    };
    let mut spec = match &options.default {
        Some(default) => quote! {
            ::dreampipe_core::stages::ParamSpec::optional(
                #name, #param_type, ::serde_json::json!(#default), #doc)
        },
        None => quote!(::dreampipe_core::stages::ParamSpec::required(#name, #param_type, #doc)),
    };
    spec = match &options.one_of {
        Some(names) => quote!(#spec.one_of(#names)),
        None => quote!(::dreampipe_core::stages::params::with_choices(#spec, #field_type::ALLOWED)),
    };
    if let Some((min, max)) = &options.range {
        spec = quote!(#spec.range(#min, #max));
    }
    if let Some(step) = &options.multiple_of {
        spec = quote!(#spec.multiple_of(#step));
    }
    for flag in &options.flags {
        spec = quote!(#spec.#flag());
    }
    Ok(quote!(specs.push(#spec);))
}

/// The field's `#[param(...)]` options.
fn options(attrs: &[Attribute]) -> syn::Result<FieldOptions> {
    let mut options = FieldOptions::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("param")) {
        attr.parse_nested_meta(|meta| {
            let key = meta
                .path
                .get_ident()
                .cloned()
                .ok_or_else(|| meta.error("unknown option"))?;
            match key.to_string().as_str() {
                "default" => options.default = Some(meta.value()?.parse()?),
                "ty" => options.ty = Some(meta.value()?.parse()?),
                "multiple_of" => options.multiple_of = Some(meta.value()?.parse()?),
                "one_of" => options.one_of = Some(meta.value()?.parse()?),
                "table" => options.table = Some(meta.value()?.parse()?),
                "range" => {
                    let content;
                    syn::parenthesized!(content in meta.input);
                    options.range = Some(two_exprs(&content)?);
                }
                "model_folder" | "not_in_key" | "keyed_when_set" | "gathers" => {
                    options.flags.push(key)
                }
                _ => return Err(meta.error("unknown param option")),
            }
            Ok(())
        })?;
    }
    Ok(options)
}

/// `<min>, <max>`.
fn two_exprs(content: ParseStream<'_>) -> syn::Result<(Expr, Expr)> {
    let min: Expr = content.parse()?;
    content.parse::<Token![,]>()?;
    let max: Expr = content.parse()?;
    Ok((min, max))
}

/// Whether the field carries `#[serde(flatten)]`.
fn is_flattened(attrs: &[Attribute]) -> syn::Result<bool> {
    let mut flattened = false;
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("flatten") {
                flattened = true;
            } else if meta.input.peek(Token![=]) {
                meta.value()?.parse::<Expr>()?;
            }
            Ok(())
        })?;
    }
    Ok(flattened)
}

/// The `///` lines, each trimmed, joined by single spaces.
fn doc_text(attrs: &[Attribute]) -> Option<String> {
    let lines: Vec<String> = attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .filter_map(|a| match &a.meta {
            syn::Meta::NameValue(nv) => match &nv.value {
                Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(text),
                    ..
                }) => Some(text.value()),
                _ => None,
            },
            _ => None,
        })
        .map(|line| line.trim().to_string())
        .filter(|line| !line.is_empty())
        .collect();
    (!lines.is_empty()).then(|| lines.join(" "))
}
