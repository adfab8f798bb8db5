//! `#[task]`: turns a plain function into the `run` export of a wasmgrid task.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::quote;
use syn::{parse_macro_input, FnArg, ItemFn, Pat, ReturnType, Type};

/// Makes this function the task of the crate.
///
/// The function keeps its signature. Its parameters are decoded from one
/// element of `args.json` (see `wasmgrid_guest::ArgDecoder`), its return value
/// is encoded as JSON, and a returned `Err(e)` becomes a task failure with
/// `e.to_string()` as its message. The macro also generates
/// `pub fn task_entry(args_json: &str) -> Result<String, wasmgrid_guest::TaskError>`,
/// which runs the task natively exactly as the worker would.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(Span::call_site(), "#[task] takes no arguments")
            .to_compile_error()
            .into();
    }
    let function = parse_macro_input!(item as ItemFn);
    match expand(&function) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

fn expand(function: &ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let sig = &function.sig;
    if let Some(asyncness) = &sig.asyncness {
        return Err(syn::Error::new_spanned(asyncness, "a task cannot be async"));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "a task cannot be generic",
        ));
    }
    let mut names = Vec::new();
    let mut types = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(receiver) => {
                return Err(syn::Error::new_spanned(
                    receiver,
                    "a task is a free function, not a method",
                ))
            }
            FnArg::Typed(typed) => match &*typed.pat {
                Pat::Ident(ident) => {
                    names.push(ident.ident.clone());
                    types.push((*typed.ty).clone());
                }
                other => {
                    return Err(syn::Error::new_spanned(
                        other,
                        "task parameters must be plain names, e.g. `lo: u64`",
                    ))
                }
            },
        }
    }
    let fn_name = &sig.ident;
    let name_strings: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let indices = 0..names.len();
    let locals: Vec<syn::Ident> = names
        .iter()
        .map(|n| syn::Ident::new(&format!("__wasmgrid_arg_{n}"), n.span()))
        .collect();
    let encode = if returns_result(&sig.output) {
        quote!(::wasmgrid_guest::encode_result)
    } else {
        quote!(::wasmgrid_guest::encode_output)
    };
    Ok(quote! {
        #function

        /// Runs the task on one JSON argument set, exactly as the worker does.
        pub fn task_entry(
            args_json: &str,
        ) -> ::core::result::Result<::std::string::String, ::wasmgrid_guest::TaskError> {
            let mut __wasmgrid_decoder =
                ::wasmgrid_guest::ArgDecoder::new(args_json, &[#(#name_strings),*])?;
            #(let #locals: #types = __wasmgrid_decoder.take(#indices)?;)*
            #encode(#fn_name(#(#locals),*))
        }

        #[cfg(target_arch = "wasm32")]
        ::wasmgrid_guest::__export_task!(task_entry);
    })
}

/// Whether the function returns a `Result` (by its written type's last segment).
fn returns_result(output: &ReturnType) -> bool {
    match output {
        ReturnType::Default => false,
        ReturnType::Type(_, ty) => match &**ty {
            Type::Path(path) => path
                .path
                .segments
                .last()
                .is_some_and(|segment| segment.ident == "Result"),
            _ => false,
        },
    }
}
